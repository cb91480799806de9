"""Session-scoped fixtures: tiny checkpoints and their compiled artifacts, built once per test run."""

from __future__ import annotations

import pytest

from checkpoints import write_checkpoint


class Artifacts:
    """Compile each (name, options) once per session; tests ask by name."""

    def __init__(self, factory):
        self.factory = factory
        self._checkpoints = {}
        self._artifacts = {}

    def checkpoint(self, name: str, **kwargs):
        if name not in self._checkpoints:
            path = self.factory.mktemp(f"ckpt-{name}")
            self._checkpoints[name] = write_checkpoint(path, **kwargs)
        return self._checkpoints[name]

    def compile(self, name: str, target, draft=None, **options):
        if name not in self._artifacts:
            from mlc_spec.compile.build import CompileOptions, compile_artifact

            out = self.factory.mktemp("dist") / name
            self._artifacts[name] = compile_artifact(target, draft, out, CompileOptions(**options), log=lambda _m: None)
        return self._artifacts[name]


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Artifacts:
    return Artifacts(tmp_path_factory)


@pytest.fixture
def good_checkpoint(artifacts):
    """The plain tiny Llama (GQA 2, untied) most tests compile."""
    return artifacts.checkpoint("llama-gqa2-untied", arch="llama", vocab_size=320)
