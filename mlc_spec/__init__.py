"""mlc_spec: exact speculative decoding over TVM-compiled Llama-family models.

`Engine` needs only a runtime TVM; `compile_artifact` pulls in the compiler on first use.
"""

import sys

# tvm_ffi imports torch wherever it is installed, for DLPack exchange with torch tensors, which mlc_spec
# never passes to TVM: 2.5 of the 4.3 s that `import mlc_spec` took, and TVMScript's parser, which reads
# every loaded module for each function it parses, runs the slower for torch's thousand. TVM loads
# without it; an `import torch` later (train-draft, bench --compare-hf) loads it as usual.
if "torch" not in sys.modules:
    sys.modules["torch"] = None  # import torch raises ImportError
    try:
        import tvm  # noqa: F401
    finally:
        del sys.modules["torch"]

from .runtime.engine import Engine, GenerationOutput, Session  # noqa: E402

__all__ = ["Engine", "GenerationOutput", "Session", "compile_artifact"]


def compile_artifact(*args, **kwargs):
    from .compile.build import compile_artifact as _compile

    return _compile(*args, **kwargs)
