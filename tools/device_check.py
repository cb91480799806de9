"""A GPU backend (CUDA or Vulkan) against the CPU reference, then a small benchmark: the cross-backend check.

Two halves (tools/device_check.sh runs them):
  prepare  with a full TVM that can generate the device's code: compiles the CPU reference (baseline
           x86-64 LLVM, float32, so it runs on any x86-64 host) and the device's artifacts (float32 and
           float16; CUDA cross-compiled with nvcc), and assembles under WORK/site what a GPU machine
           lacks: a runtime-only TVM (the package without libtvm_compiler.so), tvm_ffi for that
           machine's Python, and mlc_spec.
  run      there, with only WORK/site added to the path: the tokens and verify decisions of every
           device artifact, greedy and sampled (the same seed, so the same uniforms), drafting chains,
           token trees and n-grams, against the CPU reference (identical in float32; a mismatch rate
           in float16), the largest logit difference, then tokens per second. Writes WORK/report.json.
With --cpu-only the CPU stands in for the device, so both halves run (and are tested) without a GPU.
Vulkan: run both halves with the Python of tools/build_tvm_vulkan.sh's environment (PYTHON=...).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "float16")
NUM_PROMPTS = 50
MAX_TOKENS = 40
DRAFT_LENGTH = 4  # also the depth of the token trees
TREE_WIDTH = 2
BATCH = 8
SAMPLED = dict(temperature=0.8, top_p=0.9, seed=3)
MODES = {"speculative": dict(draft_length=DRAFT_LENGTH),
         "sampled speculative": dict(draft_length=DRAFT_LENGTH, **SAMPLED),
         "tree": dict(speculative="tree", tree_width=TREE_WIDTH, tree_depth=DRAFT_LENGTH),
         "sampled tree": dict(speculative="tree", tree_width=TREE_WIDTH, tree_depth=DRAFT_LENGTH, **SAMPLED),
         "ngram": dict(speculative="ngram", draft_length=DRAFT_LENGTH),
         "target-only": dict(speculative=False)}
DEVICES = ("cuda", "vulkan")
# What a runtime never imports: the compiler library, headers and sources for building extensions.
_NOT_RUNTIME = ("libtvm_compiler.so", "3rdparty", "include", "src", "web", "__pycache__")


# ---------------------------------------------------------------------------------------------------
# prepare (full TVM)


def prepare(work: Path, device: str, checkpoint: str | None, draft: str | None, cuda_arch: str,
            python_version: str | None) -> None:
    from mlc_spec.compile.build import CompileOptions, compile_artifact

    work.mkdir(parents=True, exist_ok=True)
    if checkpoint is None:
        checkpoint, draft = _tiny_checkpoints(work / "checkpoints")
    builds = {("cpu", "float32"): CompileOptions(cpu_target={"kind": "llvm"}, max_seq_len=256)}
    if device != "cpu":
        builds.update({(device, dtype): CompileOptions(device=device, dtype=dtype, cuda_arch=cuda_arch, max_seq_len=256)
                       for dtype in DTYPES})
    manifest = {"artifacts": {}}
    for (name, dtype), options in builds.items():
        folder = work / "artifacts" / f"{name}-{dtype}"
        print(f"prepare: compiling {name} {dtype}", flush=True)
        compile_artifact(checkpoint, draft, folder, options, log=lambda _m: None)
        manifest["artifacts"].setdefault(name, {})[dtype] = str(folder.relative_to(work))
    _runtime_site(work / "site", python_version)
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(f"prepare: done; carry {work} to the GPU machine")


def _tiny_checkpoints(folder: Path) -> tuple[Path, Path]:
    """The test suite's tiny target and a perturbed draft that agrees with it part of the time."""
    sys.path.insert(0, str(REPO / "tests"))
    from checkpoints import write_checkpoint

    target = folder / "target"
    if not target.exists():
        write_checkpoint(target, arch="llama", vocab_size=320)
    draft = folder / "draft"
    if not draft.exists():
        write_checkpoint(draft, arch="llama", vocab_size=320, perturb_from=target, noise=0.1)
    return target, draft


def _runtime_site(site: Path, python_version: str | None) -> None:
    import tvm
    import tvm_ffi

    shutil.rmtree(site, ignore_errors=True)
    shutil.copytree(Path(tvm.__file__).parent, site / "tvm", ignore=shutil.ignore_patterns(*_NOT_RUNTIME))
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if python_version in (None, here):
        shutil.copytree(Path(tvm_ffi.__file__).parent, site / "tvm_ffi", ignore=shutil.ignore_patterns("__pycache__"))
    else:  # tvm_ffi has a compiled core per Python version; tvm itself is pure Python plus libraries
        _unpack_wheel(f"apache-tvm-ffi=={_installed_version('apache-tvm-ffi')}", python_version, site)
    shutil.copytree(REPO / "mlc_spec", site / "mlc_spec", ignore=shutil.ignore_patterns("__pycache__", "default"))
    for package in ("runtime", "interface"):
        shutil.copytree(REPO / package, site / "mlc_spec" / package, ignore=shutil.ignore_patterns("__pycache__"))


def _installed_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def _unpack_wheel(requirement: str, python_version: str, site: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--python-version", python_version, "--implementation", "cp",
                        "--platform", "manylinux_2_28_x86_64", "-d", tmp, requirement], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site, [n for n in archive.namelist() if ".dist-info/" not in n])


# ---------------------------------------------------------------------------------------------------
# run (runtime-only TVM)


def run(work: Path, device: str) -> dict:
    from tvm.base import _LOADED_LIBS

    if "tvm_compiler" in _LOADED_LIBS:
        raise SystemExit(f"the full TVM was imported; put {work / 'site'} first on PYTHONPATH")
    manifest = json.loads((work / "manifest.json").read_text())
    _require_device(device)
    reference = work / manifest["artifacts"]["cpu"]["float32"]
    folders = {dtype: work / path for dtype, path in manifest["artifacts"][device].items()}
    report = {"devices": [device], "consistency": {}, "bench": {}}
    batch = _prompts(reference)
    want = _outputs(reference, "cpu", batch)
    for dtype, folder in folders.items():
        report["consistency"][dtype] = _consistency(want, _outputs(folder, device, batch), reference, folder, device)
    report["bench"] = {name: _bench(folder, name, batch) for name, folder in
                       [("cpu", {"float32": reference})] + ([] if device == "cpu" else [(device, folders)])}
    (work / "report.json").write_text(json.dumps(report, indent=2))
    _print_report(report)
    return report


def _require_device(device: str) -> None:
    import tvm
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    if device == "cuda" and "tvm_runtime_cuda" not in _LOADED_LIBS:
        runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
        try:
            _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
                package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL")
        except (OSError, RuntimeError) as err:
            raise SystemExit(f"TVM's CUDA runtime library did not load: {err}") from None
    if not tvm.device(device, 0).exist:
        raise SystemExit(f"no {device} device visible to TVM")


def _prompts(folder: Path) -> list[list[int]]:
    from mlc_spec.interface.artifact import read_artifact

    vocab = read_artifact(folder).vocab_size
    rng = np.random.default_rng(0)
    lengths = [1, 2, 15, 16, 17, 31, 32, 33] + rng.integers(1, 60, NUM_PROMPTS - 8).tolist()
    return [rng.integers(2, vocab, n).tolist() for n in lengths]


def _outputs(folder: Path, device: str, batch: list[list[int]]) -> dict:
    from mlc_spec import Engine
    from mlc_spec.consistency import generate_with_decisions

    engine = Engine(folder, device=device, max_batch_size=BATCH)
    return {mode: generate_with_decisions(engine, batch, BATCH, max_tokens=MAX_TOKENS, stop_at_eos=False, **options)
            for mode, options in MODES.items() if engine.drafts_trees or options.get("speculative") != "tree"}


def _consistency(want: dict, got: dict, reference: Path, folder: Path, device: str) -> dict:
    from mlc_spec.consistency import differing, forward_logits
    from mlc_spec.interface.artifact import read_artifact

    rng = np.random.default_rng(1)
    vocab = read_artifact(reference).vocab_size
    largest = 0.0
    for ids in (rng.integers(2, vocab, 40).tolist() for _ in range(4)):
        a, b = forward_logits(reference, "cpu", ids, (30, 35)), forward_logits(folder, device, ids, (30, 35))
        largest = max(largest, max(float(np.abs(a[k] - b[k]).max()) for k in a))
    mismatched = {mode: sum(w != g for w, g in zip(want[mode][0], got[mode][0])) for mode in want}
    return {"largest_logit_difference": largest,
            "mismatched_prompts": mismatched,
            "most_mismatched_prompts": max(mismatched.values()),
            "differing_decisions": sum(differing(want[mode][1], got[mode][1]) for mode in want)}


def _bench(folders: dict[str, Path], device: str, batch: list[list[int]]) -> dict:
    from mlc_spec import Engine

    figures = {}
    for dtype, folder in folders.items():
        engine = Engine(folder, device=device, max_batch_size=BATCH)
        figures[dtype] = {}
        for mode, opts in (("speculative", dict(draft_length=DRAFT_LENGTH)), ("target-only", dict(speculative=False))):
            engine.generate(token_ids=batch[:BATCH], max_tokens=8, stop_at_eos=False, **opts)  # warm-up
            start = time.perf_counter()
            tokens = sum(len(o.token_ids) for o in
                         engine.generate(token_ids=batch[:BATCH], max_tokens=MAX_TOKENS, stop_at_eos=False, **opts))
            figures[dtype][mode] = tokens / (time.perf_counter() - start)
    return figures


def _print_report(report: dict) -> None:
    device = report["devices"][0]
    print(f"\nconsistency: {device} against the CPU reference (float32), {NUM_PROMPTS} prompts")
    for dtype, row in report["consistency"].items():
        print(f"  {dtype:<8} largest logit difference {row['largest_logit_difference']:.3g}, "
              f"differing decisions {row['differing_decisions']}; prompts whose tokens differ: "
              + ", ".join(f"{mode} {n}" for mode, n in row["mismatched_prompts"].items()))
    print(f"\nbench: tokens per second, batch {BATCH}, {MAX_TOKENS} tokens, draft length {DRAFT_LENGTH}")
    for name, dtypes in report["bench"].items():
        for dtype, row in dtypes.items():
            print(f"  {name:<5} {dtype:<8} speculative {row['speculative']:8.1f}   target-only {row['target-only']:8.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("prepare", "run"))
    parser.add_argument("--work", type=Path, default=REPO / ".device_check")
    parser.add_argument("--device", choices=DEVICES, default="cuda")
    parser.add_argument("--cpu-only", action="store_true", help="the CPU stands in for the device")
    parser.add_argument("--checkpoint", help="target checkpoint (default: the test suite's tiny model)")
    parser.add_argument("--draft", help="draft checkpoint, with --checkpoint")
    parser.add_argument("--cuda-arch", default="sm_90")
    parser.add_argument("--python-version", help="the GPU machine's Python, X.Y (default: this one's)")
    args = parser.parse_args(argv)
    device = "cpu" if args.cpu_only else args.device
    if args.step == "prepare":
        prepare(args.work, device, args.checkpoint, args.draft, args.cuda_arch, args.python_version)
    else:
        report = run(args.work, device)
        consistency = report["consistency"].get("float32", {})
        if consistency.get("most_mismatched_prompts") or consistency.get("differing_decisions"):
            print("FAILED: float32 output differs from the CPU reference")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
