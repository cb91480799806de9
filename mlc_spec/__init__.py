"""mlc_spec: exact speculative decoding over TVM-compiled Llama-family models.

`Engine` needs only a runtime TVM; `compile_artifact` pulls in the compiler on first use.
"""

from .runtime.engine import Engine, GenerationOutput, Session

__all__ = ["Engine", "GenerationOutput", "Session", "compile_artifact"]


def compile_artifact(*args, **kwargs):
    from .compile.build import compile_artifact as _compile

    return _compile(*args, **kwargs)
