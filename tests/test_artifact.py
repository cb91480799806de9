"""The artifact's schema: written by the compiler, read by the runtime, anything else refused with one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mlc_spec import Engine
from mlc_spec.interface.artifact import (CONFIG_FILE, FORMAT_VERSION, ArtifactConfig, ArtifactError, read_artifact,
                                         write_config)
from mlc_spec.runtime.speculative import RoundStats


@pytest.fixture(scope="module")
def artifact(artifacts):
    ckpt = artifacts.checkpoint("llama-gqa2-untied", arch="llama", vocab_size=320)
    return artifacts.compile("llama-gqa2-untied", ckpt)


@pytest.fixture
def copy(artifact, tmp_path) -> Path:
    return Path(shutil.copytree(artifact, tmp_path / "artifact"))


def _edit_config(folder: Path, **fields) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    config.update(fields)
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def test_the_config_reads_back_as_written(artifact, tmp_path):
    config = read_artifact(artifact, check_hashes=True)
    assert config.format == FORMAT_VERSION and config.models["target"].param_names
    assert {f.name for f in config.models["target"].__dataclass_fields__.values()} >= {"library", "params"}
    write_config(tmp_path, config)
    assert ArtifactConfig.from_json(json.loads((tmp_path / CONFIG_FILE).read_text()), "again") == config


def test_decode_bytes_leave_out_only_the_gathered_embedding(artifact):
    from safetensors.numpy import load_file

    target = read_artifact(artifact).models["target"]
    params = load_file(artifact / target.params)
    embedding = params["model.embed_tokens"]
    assert embedding.shape[0] == 320  # untied: its own table, of which a decode reads one row
    assert target.param_bytes == sum(p.nbytes for p in params.values())
    assert target.decode_bytes == target.param_bytes - embedding.nbytes


@pytest.mark.parametrize("version", [1, FORMAT_VERSION + 1, None])
def test_another_format_version_is_refused_with_the_fix(copy, version):
    _edit_config(copy, format=version)
    with pytest.raises(ArtifactError, match=r"another version of mlc_spec.*recompile it with `mlc_spec compile`"):
        Engine(copy)


def test_a_config_of_the_wrong_shape_is_refused(copy):
    _edit_config(copy, build={"max_seq_len": "long"})
    with pytest.raises(ArtifactError, match=f"{CONFIG_FILE} is damaged"):
        Engine(copy)
    (copy / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        Engine(copy)


def test_a_truncated_library_is_refused_before_it_is_mapped(copy):
    """A truncated .so crashed the process that loaded it (SIGBUS); its recorded size catches it first."""
    library = copy / read_artifact(copy).models["target"].library
    library.write_bytes(library.read_bytes()[:4096])
    with pytest.raises(ArtifactError, match=f"{library.name}: 4096 bytes, the artifact recorded"):
        Engine(copy)


def test_a_replaced_file_of_the_same_size_fails_only_the_hash_check(copy):
    params = copy / read_artifact(copy).models["target"].params
    data = bytearray(params.read_bytes())
    data[-1] ^= 0xFF
    params.write_bytes(bytes(data))
    Engine(copy)  # sizes only
    with pytest.raises(ArtifactError, match=f"{params.name}: its sha256 is not the one the artifact recorded"):
        Engine(copy, check_hashes=True)


def test_a_missing_file_is_named(copy):
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match="tokenizer.json: missing from the artifact"):
        Engine(copy)


def test_code_for_cpu_features_the_host_lacks_is_refused(copy):
    config = json.loads((copy / CONFIG_FILE).read_text())
    config["cpu_features"] = [*config["cpu_features"], "AVX512_SPR", "VSX4"]
    (copy / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="compiled for a CPU with .*VSX4.*recompile it on this machine"):
        Engine(copy)


def test_the_observer_sees_every_round(artifact):
    """generate's observer gets each round's decisions and committed tokens: together, the output."""
    rounds: list[RoundStats] = []
    out = Engine(artifact).generate(token_ids=[5, 6, 7], max_tokens=20, stop_at_eos=False, speculative="ngram",
                                    draft_length=2, observer=rounds.append)
    assert [t for r in rounds for t in r.tokens[0]] == out.token_ids
    assert all(len(r.tokens[0]) == r.accepted[0] + 1 and r.accepted[0] <= r.drafted[0] for r in rounds)
    assert len(rounds) == out.stats["rounds"]


def test_a_damaged_or_outdated_cached_default_is_compiled_again(copy):
    """The cached default pair is checked file by file (hashes too) and rebuilt rather than crash every chat."""
    from mlc_spec import default_model

    notes = []
    assert default_model._usable(copy, notes.append) and not notes
    params = copy / read_artifact(copy).models["target"].params
    data = bytearray(params.read_bytes())
    data[0] ^= 0xFF
    params.write_bytes(bytes(data))
    assert not default_model._usable(copy, notes.append)
    _edit_config(copy, format=FORMAT_VERSION - 1)
    assert not default_model._usable(copy, notes.append)
    assert len(notes) == 2 and all("compiling it again" in n for n in notes)


@pytest.mark.parametrize("mcpu,fmt", [("znver4", "q8_0"), ("alderlake", "q8_0"), ("znver3", "q4_1"), ("x86-64", "q4_1")])
def test_default_draft_is_quantized_after_the_cpus_integer_dot_product(monkeypatch, mcpu, fmt):
    """int8 weights cost no more per row than 4-bit ones only with VNNI (AVX-512's on Zen 4, AVX-VNNI
    on Alder Lake): the default draft is Q8_0 there and Q4_1 on AVX2 (Zen 3) and the float path."""
    from mlc_spec import default_model
    from mlc_spec.compile import targets

    monkeypatch.setattr(targets, "host_target", lambda: {"kind": "llvm", "mcpu": mcpu})
    assert default_model.draft_quantization("cpu") == fmt
    assert default_model.draft_quantization("cuda") is None
