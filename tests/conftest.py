"""Session-scoped fixtures: tiny checkpoints and their compiled artifacts, built once per test run."""

from __future__ import annotations

import pytest

from checkpoints import write_checkpoint
from helpers import VOCAB


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


@pytest.fixture(scope="session")
def partial_artifact(artifacts):
    """The tiny Llama with a perturbed copy as its draft (partial acceptance, where rollback bugs live),
    128 tokens per sequence: the engine, scheduler and server tests share it."""
    target = artifacts.checkpoint("llama-gqa2-untied", arch="llama", vocab_size=VOCAB)
    draft = artifacts.checkpoint("perturbed", arch="llama", vocab_size=VOCAB, perturb_from=target, noise=0.1)
    return artifacts.compile("spec-partial", target, draft, max_seq_len=128)
