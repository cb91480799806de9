"""mlc_spec compile: logits against transformers, the artifact, bad inputs, runtime-only loading."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm

from helpers import SHAPES, assert_empty, compile_error, copy_checkpoint, hf_logits, run_forwards
from mlc_spec.consistency import target_library
from mlc_spec.compile import kernels
from mlc_spec.interface.artifact import read_artifact

# float16 weights and activations against transformers in float32: logits here span about +-15.
FLOAT16_TOLERANCE = 5e-2


@pytest.mark.parametrize("name", SHAPES)
def test_logits_match_transformers_float32(artifacts, name):
    arch, opts = SHAPES[name]
    ckpt = artifacts.checkpoint(name, arch=arch, **opts)
    artifact = artifacts.compile(name, ckpt)
    ids = np.random.default_rng(1).integers(0, opts["vocab_size"], 40).tolist()
    ref = hf_logits(ckpt, ids)
    got = run_forwards(artifact, ids, (30, 35))
    np.testing.assert_allclose(got["prefill"], ref[29], atol=1e-4)
    np.testing.assert_allclose(got["decode"], ref[30], atol=1e-4)
    np.testing.assert_allclose(got["verify"], ref[31:35], atol=1e-4)


def test_logits_float16_within_documented_tolerance(artifacts):
    arch, opts = SHAPES["llama-gqa2-untied"]
    ckpt = artifacts.checkpoint("llama-gqa2-untied", arch=arch, **opts)
    artifact = artifacts.compile("llama-f16", ckpt, dtype="float16")
    ids = np.random.default_rng(2).integers(0, opts["vocab_size"], 24).tolist()
    ref = hf_logits(ckpt, ids)
    got = run_forwards(artifact, ids, (16, 24))
    assert np.abs(got["prefill"] - ref[15]).max() < FLOAT16_TOLERANCE
    assert np.abs(got["decode"] - ref[16]).max() < FLOAT16_TOLERANCE
    assert np.abs(got["verify"] - ref[17:24]).max() < FLOAT16_TOLERANCE


def test_bfloat16_checkpoint_is_read(artifacts):
    arch, opts = SHAPES["llama-gqa2-untied"]
    ckpt = artifacts.checkpoint("llama-bf16", arch=arch, dtype=torch.bfloat16, **opts)
    artifact = artifacts.compile("llama-bf16", ckpt)
    ids = list(range(3, 23))
    ref = hf_logits(ckpt, ids)  # transformers upcasts the same bfloat16 values to float32
    np.testing.assert_allclose(run_forwards(artifact, ids, (12, 20))["verify"], ref[13:20], atol=1e-4)


def test_artifact_layout_and_config(artifacts):
    arch, opts = SHAPES["qwen2-bias-tied"]
    artifact = artifacts.compile("qwen2-bias-tied", artifacts.checkpoint("qwen2-bias-tied", arch=arch, **opts))
    config = json.loads((artifact / "mlc_spec_config.json").read_text())
    assert config["device"] == "cpu" and config["dtype"] == "float32"
    assert config["target"]["kind"] == "llvm" and config["target"]["mcpu"]
    assert config["vocab_size"] == 290
    assert config["special_tokens"]["eos_token_ids"] == [1]
    assert config["versions"]["tvm"] == tvm.__version__
    target = config["models"]["target"]
    assert target["config"]["architecture"] == "Qwen2ForCausalLM" and target["config"]["attention_bias"]
    assert {target["library"], target["params"], "tokenizer.json"} <= {p.name for p in artifact.iterdir()}
    assert not [p for p in artifact.parent.iterdir() if p.name.startswith(".")], "staging folders left behind"


def test_exported_functions(artifacts):
    """The forwards, the cache constructor and every registry kernel, whose signatures the artifact records."""
    arch, opts = SHAPES["llama-gqa2-untied"]
    artifact = artifacts.compile("llama-gqa2-untied", artifacts.checkpoint("llama-gqa2-untied", arch=arch, **opts))
    lib = target_library(artifact)
    recorded = [k.name for k in read_artifact(artifact).kernels]
    assert recorded == list(kernels.KERNEL_NAMES)
    for name in ("prefill", "batch_decode", "verify", "create_paged_kv_cache", *recorded):
        assert lib.vm[name] is not None


def test_decode_and_tree_verify_agree_with_chain(artifacts):
    """Decode after a token tree on CPU (upstream's swapped kernels fail here)."""
    arch, opts = SHAPES["llama-gqa2-untied"]
    ckpt = artifacts.checkpoint("llama-gqa2-untied", arch=arch, **opts)
    artifact = artifacts.compile("llama-gqa2-untied", ckpt)
    lib = target_library(artifact)
    kv = lib.create_kv_cache(max_batch_size=2, max_total_seq_len=256, prefill_chunk_size=64, page_size=16)
    prompt = list(range(5, 25))
    kv.add_sequence(0)
    lib.forward_last(kv, [0], [prompt])
    # tree: root a, children b and c, b's child d -> paths [a], [a,b], [a,c], [a,b,d]
    tree, parents = [40, 41, 42, 43], [-1, 0, 0, 1]
    logits = lib.forward_all(kv, [0], [tree], tree_parents=parents).numpy()
    ref_ab_d = hf_logits(ckpt, prompt + [40, 41, 43])
    ref_ac = hf_logits(ckpt, prompt + [40, 42])
    np.testing.assert_allclose(logits[[0, 1, 3]], ref_ab_d[-3:], atol=1e-4)
    np.testing.assert_allclose(logits[2], ref_ac[-1], atol=1e-4)
    kv.commit_tree([0], [3])  # keep a, b, d
    assert kv.length(0) == len(prompt) + 3
    decoded = lib.forward_last(kv, [0], [[44]])
    np.testing.assert_allclose(decoded.numpy()[0], hf_logits(ckpt, prompt + [40, 41, 43, 44])[-1], atol=1e-4)


# -- bad input: one clear line, exit status 2, nothing left in the output folder ---------------------------
def test_missing_folder(tmp_path, capsys):
    err = compile_error(capsys, [str(tmp_path / "nope"), "--output", str(tmp_path / "out" / "a")])
    assert "no such file or folder" in err
    assert_empty(tmp_path / "out")


def test_missing_config(tmp_path, capsys, good_checkpoint):
    ckpt = copy_checkpoint(good_checkpoint, tmp_path / "m")
    (ckpt / "config.json").unlink()
    assert "no config.json" in compile_error(capsys, [str(ckpt), "--output", str(tmp_path / "out" / "a")])
    assert_empty(tmp_path / "out")


def test_missing_weights(tmp_path, capsys, good_checkpoint):
    ckpt = copy_checkpoint(good_checkpoint, tmp_path / "m")
    (ckpt / "model.safetensors").unlink()
    assert "no *.safetensors" in compile_error(capsys, [str(ckpt), "--output", str(tmp_path / "out" / "a")])
    assert_empty(tmp_path / "out")


def test_unsupported_architecture(tmp_path, capsys, good_checkpoint):
    ckpt = copy_checkpoint(good_checkpoint, tmp_path / "m")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    err = compile_error(capsys, [str(ckpt), "--output", str(tmp_path / "out" / "a")])
    assert "unsupported architecture" in err and "LlamaForCausalLM" in err


def test_corrupt_safetensors(tmp_path, capsys, good_checkpoint):
    ckpt = copy_checkpoint(good_checkpoint, tmp_path / "m")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    err = compile_error(capsys, [str(ckpt), "--output", str(tmp_path / "out" / "a")])
    assert "model.safetensors" in err
    assert_empty(tmp_path / "out")


def test_mismatched_draft_vocabulary(tmp_path, capsys, good_checkpoint, artifacts):
    other = artifacts.checkpoint("other-tokenizer", arch="llama", vocab_size=320, tokenizer_vocab=290)
    err = compile_error(capsys, [str(good_checkpoint), "--draft", str(other), "--output", str(tmp_path / "out" / "a")])
    assert "different tokenizers" in err
    assert_empty(tmp_path / "out")


def test_unknown_device(tmp_path, capsys, good_checkpoint):
    err = compile_error(capsys, [str(good_checkpoint), "--device", "tpu", "--output", str(tmp_path / "a")])
    assert "unknown device 'tpu'" in err


@pytest.mark.skipif(tvm.support.libinfo().get("USE_VULKAN") == "ON", reason="this TVM can build Vulkan")
def test_device_this_tvm_cannot_build(tmp_path, capsys, good_checkpoint):
    err = compile_error(capsys, [str(good_checkpoint), "--device", "vulkan", "--output", str(tmp_path / "a")])
    assert "cannot generate vulkan code" in err and "USE_VULKAN=ON" in err


def test_output_not_writable(tmp_path, capsys, good_checkpoint):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    err = compile_error(capsys, [str(good_checkpoint), "--output", str(blocker / "a")])
    assert "choose a writable --output" in err


def test_c_compiler_failure_is_one_line(tmp_path, capsys, good_checkpoint, monkeypatch):
    """The attention glue that every CPU library links (compile/cpu_attention.c) failing to compile: the
    compiler's last line, as text, and no artifact."""
    from mlc_spec.compile import attention

    broken = tmp_path / "cpu_attention.c"
    broken.write_text("int broken(void) { return }\n")
    monkeypatch.setattr(attention, "GLUE_SOURCE", broken)
    out = tmp_path / "a"
    err = compile_error(capsys, [str(good_checkpoint), "--output", str(out)])
    assert "cpu_attention.c did not compile:" in err and "error" in err and "['" not in err, err
    assert_empty(out)


def test_interrupted_compile_leaves_nothing(tmp_path, good_checkpoint, monkeypatch):
    from mlc_spec.compile import build

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build.compile_artifact(good_checkpoint, output=tmp_path / "out" / "a", log=lambda _m: None)
    assert_empty(tmp_path / "out")


# -- runtime-only TVM ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def runtime_only_tvm(tmp_path_factory) -> Path:
    """A copy of the installed tvm package without libtvm_compiler.so, as shipped to a GPU box."""
    root = tmp_path_factory.mktemp("runtime-only")
    src = Path(tvm.__file__).parent
    shutil.copytree(src, root / "tvm", ignore=shutil.ignore_patterns("libtvm_compiler.so", "__pycache__"))
    return root


RUNTIME_ONLY_SCRIPT = """
import json, sys
import tvm
assert "tvm_compiler" not in tvm.base._LOADED_LIBS, "the compiler library was loaded"
try:
    import tvm.relax  # noqa
    sys.exit("tvm.relax imported on a runtime-only TVM")
except Exception:
    pass
from mlc_spec import Engine
out = Engine(sys.argv[1]).generate(token_ids=[3, 4, 5, 6], max_tokens=8, stop_at_eos=False)
print(json.dumps(out.token_ids))
"""


def test_artifact_runs_on_runtime_only_tvm(artifacts, good_checkpoint, runtime_only_tvm):
    artifact = artifacts.compile("llama-gqa2-untied", good_checkpoint)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(runtime_only_tvm), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", RUNTIME_ONLY_SCRIPT, str(artifact)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from mlc_spec import Engine

    expected = Engine(artifact).generate(token_ids=[3, 4, 5, 6], max_tokens=8, stop_at_eos=False).token_ids
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == expected


# -- GGUF -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_compiles_to_its_dequantized_weights(tmp_path, qtype, monkeypatch):
    """A tiny GGUF (written with gguf's writer) compiles with its blocks kept as they are; logits equal
    transformers' on the dequantized weights on the float path (a generic CPU target: this CPU's
    integer path quantizes activations, tests/test_quantization.py). The artifact records the file's
    absolute path, given a relative one (bench and train-draft reopen it from anywhere)."""
    import gguf
    from gguf_files import byte_level_vocab, tiny_llama, train_byte_level_tokenizer, write_gguf
    from transformers import LlamaForCausalLM

    from mlc_spec.compile.build import CompileOptions, compile_artifact
    from mlc_spec.compile.gguf_reader import read_gguf

    tokenizer = train_byte_level_tokenizer("gpt-2")
    config, _, tensors = tiny_llama(tokenizer.get_vocab_size(with_added_tokens=True))
    path = tmp_path / f"tiny-{qtype}.gguf"
    write_gguf(path, "llama", config, tensors, byte_level_vocab(tokenizer, "gpt-2"), qtype=gguf.GGMLQuantizationType[qtype])
    monkeypatch.chdir(tmp_path)
    artifact = compile_artifact(Path(path.name), output=tmp_path / "out", options=CompileOptions(cpu_target={"kind": "llvm"}),
                                log=lambda _m: None)
    model = LlamaForCausalLM(config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in read_gguf(path).tensors.items()}, strict=False)
    ids = list(range(3, 33))
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    got = run_forwards(artifact, ids, (20, 30))
    # 4-bit matmuls sum per group, scale * sum(x * code) + min * sum(x), as llama.cpp does; with
    # min about -8 scale the two terms are up to ~16x the result, and so is their float32 rounding.
    atol = 3e-4 if qtype.startswith("Q4") else 1e-4
    np.testing.assert_allclose(got["prefill"], ref[19], atol=atol, rtol=1e-5)
    np.testing.assert_allclose(got["verify"], ref[21:30], atol=atol, rtol=1e-5)
    target = json.loads((artifact / "mlc_spec_config.json").read_text())["models"]["target"]
    assert target["source"] == str(path.resolve())
    kept = target["quantization"]
    assert set(kept.values()) == (set() if qtype == "F32" else {qtype.lower()})
    assert len(kept) == (0 if qtype == "F32" else 4 * config.num_hidden_layers + 1)


# -- other backends -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["opencl", "webgpu", "metal"])
def test_gpu_source_backends_build(artifacts, good_checkpoint, device):
    artifact = artifacts.compile(f"llama-{device}", good_checkpoint, device=device)
    config = json.loads((artifact / "mlc_spec_config.json").read_text())
    assert config["device"] == device and config["target"]["kind"] == device
    assert (artifact / f"target-{device}.so").stat().st_size > 0


@pytest.mark.skipif(not (shutil.which("nvcc") and (shutil.which("cc") or shutil.which("gcc"))),
                    reason="building CUDA device code needs nvcc and a C compiler")
def test_cuda_build_carries_device_binaries(artifacts, good_checkpoint):
    """Built here without a GPU: real fatbins through nvcc, never a source-only module."""
    artifact = artifacts.compile("llama-cuda", good_checkpoint, device="cuda", cuda_arch="sm_90")
    from mlc_spec.compile.cuda import cuda_modules

    cuda = cuda_modules(tvm.runtime.load_module(str(artifact / "target-cuda.so")))
    assert cuda and all(m.is_runnable() for m in cuda)
    config = json.loads((artifact / "mlc_spec_config.json").read_text())
    assert config["target"] == {"kind": "cuda", "arch": "sm_90"} and config["build"]["cuda_arch"] == "sm_90"


# -- output paths: compile replaces only what a compile made -------------------------------------------------
def fake_artifact(folder: Path, *extra: str) -> Path:
    """A folder shaped like an artifact (its config names its files), with extra files of a user's."""
    folder.mkdir(parents=True)
    models = {"target": {"library": "target-cpu.so", "params": "target.safetensors"}}
    (folder / "mlc_spec_config.json").write_text(json.dumps({"models": models}))
    for name in ("tokenizer.json", "target-cpu.so", "target.safetensors", *extra):
        (folder / name).write_text("x")
    return folder


def test_output_that_is_a_file_is_refused(tmp_path, capsys, good_checkpoint):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    err = compile_error(capsys, [str(good_checkpoint), "--output", str(file)])
    assert "is a file, not a folder" in err and file.read_text() == "mine"


def test_output_folder_of_other_files_is_refused(tmp_path, capsys, good_checkpoint):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_text("mine")
    err = compile_error(capsys, [str(good_checkpoint), "--output", str(tmp_path / "photos")])
    assert "not an mlc_spec artifact" in err and "choose a new or empty folder" in err
    assert (tmp_path / "photos" / "cat.jpg").read_text() == "mine"


@pytest.mark.parametrize("where", ["itself", "its parent"])
def test_output_holding_the_source_is_refused(tmp_path, capsys, good_checkpoint, where):
    ckpt = copy_checkpoint(good_checkpoint, tmp_path / "models" / "m")
    output = ckpt if where == "itself" else ckpt.parent
    err = compile_error(capsys, [str(ckpt), "--output", str(output)])
    assert ("is the checkpoint" if where == "itself" else "contains the checkpoint") in err
    assert (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file()


def test_output_current_folder_is_refused(tmp_path, capsys, good_checkpoint, monkeypatch):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    err = compile_error(capsys, [str(good_checkpoint), "--output", "."])
    assert "is the current folder" in err
    assert_empty(tmp_path / "here")


def test_artifact_holding_a_user_file_is_refused(tmp_path, capsys, good_checkpoint):
    artifact = fake_artifact(tmp_path / "art", "my-notes.md")
    err = compile_error(capsys, [str(good_checkpoint), "--output", str(artifact)])
    assert "also holds my-notes.md" in err and (artifact / "my-notes.md").read_text() == "x"


@pytest.mark.parametrize("value", ["0", "100000000"])
def test_max_seq_len_out_of_range_is_refused(tmp_path, capsys, good_checkpoint, value):
    err = compile_error(capsys, [str(good_checkpoint), "--max-seq-len", value, "--output", str(tmp_path / "a")])
    assert f"--max-seq-len must be between 16 and {2**20}" in err


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_an_artifact_is_replaced_and_stale_staging_is_swept(tmp_path, good_checkpoint):
    """An older artifact is swapped out whole; what killed compiles left in the folder is removed, a live
    compile's staging is not."""
    artifact = fake_artifact(tmp_path / "art")
    stale = [tmp_path / f".art.partial-{dead_pid()}-abc", tmp_path / f".other.old-{dead_pid()}-x_1"]
    live = tmp_path / f".art.partial-{os.getpid()}-live"
    for folder in (*stale, live):
        folder.mkdir()
        (folder / "target.safetensors").write_text("95 MB of it")
    from mlc_spec.compile.build import compile_artifact

    compile_artifact(good_checkpoint, output=artifact, log=lambda _m: None)
    config = json.loads((artifact / "mlc_spec_config.json").read_text())
    assert config["models"]["target"]["config"]["architecture"] == "LlamaForCausalLM"
    assert not any(folder.exists() for folder in stale) and live.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "art"]


@pytest.mark.parametrize("signum, code, line", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_a_signal_during_compile_removes_the_staging_folder(tmp_path, good_checkpoint, signum, code, line):
    # A shell's background job ignores SIGINT, and its children inherit that: give the compile the default
    # a user's terminal gives it (Python then turns SIGINT into KeyboardInterrupt).
    proc = subprocess.Popen([sys.executable, "-m", "mlc_spec.cli", "compile", str(good_checkpoint), "--output",
                             str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for out_line in proc.stdout:  # TVM is building: the staging folder exists
        if out_line.startswith("build:"):
            break
    assert [p.name for p in tmp_path.iterdir()][0].startswith(".out.partial-")
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == line
    assert list(tmp_path.iterdir()) == []


# -- checkpoint configs checked against their types and tensors -------------------------------------------------
def edited_checkpoint(src: Path, dst: Path, **fields) -> Path:
    ckpt = copy_checkpoint(src, dst)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, **fields}))
    return ckpt


def test_architectures_as_a_string_is_one_architecture(good_checkpoint):
    from mlc_spec.compile.config import ModelConfig

    cfg = json.loads((good_checkpoint / "config.json").read_text())
    assert ModelConfig.from_hf({**cfg, "architectures": "LlamaForCausalLM"}).architecture == "LlamaForCausalLM"


@pytest.mark.parametrize("fields, message", [
    ({"hidden_size": [64]}, "hidden_size must be an integer, got [64]"),
    ({"num_hidden_layers": True}, "num_hidden_layers must be an integer, got True"),
    ({"vocab_size": 320.5}, "vocab_size must be an integer, got 320.5"),
    ({"num_attention_heads": 0}, "num_attention_heads must be >= 1, got 0"),
    ({"rms_norm_eps": "small"}, "rms_norm_eps must be a number, got 'small'"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be True or False, got 'yes'"),
    ({"eos_token_id": ["</s>"]}, "eos_token_id must be an integer, got '</s>'"),
    ({"architectures": {"name": "LlamaForCausalLM"}}, "architectures must be a list of class names"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling lacks 'low_freq_factor'"),
])
def test_config_field_of_the_wrong_type_is_refused(tmp_path, capsys, good_checkpoint, fields, message):
    ckpt = edited_checkpoint(good_checkpoint, tmp_path / "m", **fields)
    assert message in compile_error(capsys, [str(ckpt), "--output", str(tmp_path / "out")])


def test_config_that_is_not_an_object_is_refused(tmp_path, capsys, good_checkpoint):
    ckpt = copy_checkpoint(good_checkpoint, tmp_path / "m")
    (ckpt / "config.json").write_text("[1, 2]")
    assert "holds a JSON list, not an object" in compile_error(capsys, [str(ckpt), "--output", str(tmp_path / "out")])


def test_fewer_layers_in_the_config_than_in_the_weights_is_refused(tmp_path, capsys, good_checkpoint):
    ckpt = edited_checkpoint(good_checkpoint, tmp_path / "m", num_hidden_layers=1)
    err = compile_error(capsys, [str(ckpt), "--output", str(tmp_path / "out")])
    assert "num_hidden_layers 1 but the weights hold layers 0..1; set num_hidden_layers to 2" in err
    assert_empty(tmp_path / "out")
