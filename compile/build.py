"""mlc_spec compile: checkpoints -> a model library folder, written atomically.

Stages, each announced through `log`: load, convert, lower, build, write. The folder is assembled in a
hidden temporary sibling and renamed into place only when complete, so a failed or interrupted compile
leaves nothing half-written behind. It replaces only what a compile made: the output must be new, an
empty folder, or an mlc_spec artifact with nothing else in it; never the source or a folder holding it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tvm
from safetensors.numpy import save_file

from ..interface.artifact import CONFIG_FILE, ArtifactConfig, BuildOptions, ModelEntry, with_files, write_config
from ..runtime import options as check
from . import attention, kernels, workarounds
from .checkpoint import GATHERED_EMBEDDING, QUANTIZATIONS, Checkpoint, convert_weights, load_checkpoint
from .config import CompileError, ModelConfig
from .eagle import KIND, TOKEN_IDS, EagleDraft, eagle_checkpoint, feature_layers, is_eagle_folder
from .model import CausalLM, WeightLayout
from .pipeline import pipeline_for, tir_pipeline_for
from .streaming_matmul import weight_tile
from .targets import model_target, required_cpu_features, resolve_target
from .tokenizer import check_same_tokenizer, special_tokens


@dataclasses.dataclass
class CompileOptions:
    device: str = "cpu"
    dtype: str = "float32"
    max_seq_len: int = 2048
    page_size: int = 16
    prefill_chunk_size: int = 512
    cuda_arch: str = "sm_90"
    # checkpoint.QUANTIZATIONS; the draft follows the target's unless draft_quantization says otherwise.
    quantization: str = "keep"
    draft_quantization: str | None = None
    # A CPU code generator other than LLVM for this CPU: a dict target of kind llvm or c (device cpu).
    cpu_target: dict | None = None
    # The target's *_hidden forwards, which a feature draft reads (always there with one, exporting the
    # layers it fuses) and train-draft too: the target layers whose outputs precede its last hidden state
    export_features: tuple[int, ...] | None = None


def compile_artifact(target: str | Path, draft: str | Path | None = None, output: str | Path | None = None,
                     options: CompileOptions | None = None, log: Callable[[str], None] = print) -> Path:
    opts = options or CompileOptions()
    _check_options(opts)
    workarounds.register()
    tvm_target = resolve_target(opts.device, opts.cuda_arch, opts.cpu_target)
    out = Path(output) if output else Path("dist") / _default_name(target, draft, opts)
    sources = [Path(target)] + ([Path(draft)] if draft is not None else [])
    _check_output(out, sources)
    log(f"load: {target}" + (f" and draft {draft}" if draft else ""))
    checkpoints = {"target": load_checkpoint(target)}
    kinds = {"target": "model"}
    if draft is not None and is_eagle_folder(draft):
        checkpoints["draft"], token_ids = eagle_checkpoint(draft, checkpoints["target"])
        kinds["draft"] = KIND
        opts = dataclasses.replace(opts, export_features=feature_layers(checkpoints["draft"]))
    elif draft is not None:
        checkpoints["draft"] = load_checkpoint(draft)
        kinds["draft"] = "model"
    configs = {role: ck.config for role, ck in checkpoints.items()}
    vocab = configs["target"].vocab_size
    if kinds.get("draft") == "model":
        check_same_tokenizer(checkpoints["target"], checkpoints["draft"])
    staging = _staging_dir(out)
    try:
        extra = {"draft": {TOKEN_IDS: token_ids.astype(np.int32)}} if kinds.get("draft") == KIND else {}
        models = {role: _build_model(role, checkpoints[role], configs[role], vocab, tvm_target, opts, staging, log,
                                     kinds, extra.get(role, {}))
                  for role in checkpoints}
        log(f"write: {out}")
        (staging / "tokenizer.json").write_text(checkpoints["target"].tokenizer_json)
        _write_config(staging, checkpoints["target"], configs, models, tvm_target, opts)
        _check_output(out, sources)  # again: the folder may have changed during the build
        _replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _check_options(opts: CompileOptions) -> None:
    if opts.dtype not in ("float32", "float16"):
        raise CompileError(f"unsupported dtype {opts.dtype!r}; choose float32 or float16")
    if opts.page_size not in (8, 16, 32, 64):
        raise CompileError(f"page size {opts.page_size} is not supported; choose 8, 16, 32 or 64")
    for option, value in (("--quantization", opts.quantization), ("--draft-quantization", opts.draft_quantization)):
        if value is not None and value not in QUANTIZATIONS:
            raise CompileError(f"unknown {option} {value!r}; choose one of {', '.join(QUANTIZATIONS)}")
    try:
        check.integer("--max-seq-len", opts.max_seq_len, opts.page_size, check.MAX_SEQ_LEN,
                      hint=f" (one page of {opts.page_size} tokens at least)")
    except ValueError as err:
        raise CompileError(str(err)) from None


def _default_name(target: str | Path, draft: str | Path | None, opts: CompileOptions) -> str:
    stem = lambda p: Path(p).name.removesuffix(".gguf")  # noqa: E731
    name = stem(target) + (f"+{stem(draft)}" if draft else "")
    quantized = "" if opts.quantization == "keep" else f"-{opts.quantization}"
    return f"{name}{quantized}-{opts.dtype}-{opts.device}"


def _check_output(out: Path, sources: list[Path]) -> None:
    """Refuse an output whose replacement would lose something that compile did not make."""
    where, cwd = out.resolve(), Path.cwd()
    for source in (s.resolve() for s in sources):
        if where == source or where in source.parents:
            raise CompileError(f"--output {out} {'is' if where == source else 'contains'} the checkpoint {source}; "
                               "choose an output folder outside it")
    if where == cwd or where in cwd.parents:
        raise CompileError(f"--output {out} is the current folder or holds it; name a new folder, e.g. {out / 'artifact'}")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise CompileError(f"--output {out} is a file, not a folder; choose another path (compile writes a folder)")
    present = {p.name for p in out.iterdir()} if out.exists() else set()
    if not present:
        return
    if CONFIG_FILE not in present:
        raise CompileError(f"--output {out} is a folder of other files, not an mlc_spec artifact; "
                           "choose a new or empty folder")
    extra = sorted(present - _artifact_files(out))
    if extra:
        raise CompileError(f"--output {out} is an artifact but also holds {extra[0]}, which compile did not write; "
                           "move it out or choose another folder")


def _artifact_files(folder: Path) -> set[str]:
    """The files an existing artifact's config names as its own."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        models = config["models"].values()
        return {CONFIG_FILE, "tokenizer.json"} | {m[key] for m in models for key in ("library", "params")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise CompileError(f"--output {folder} has an unreadable {CONFIG_FILE}, so what else it holds is unknown; "
                           "delete the folder yourself or choose another") from None


# A staging or swapped-out folder: .NAME.partial-PID-XXXX or .NAME.old-PID-XXXX, PID the compile's process.
_TEMPORARY = re.compile(r"^\..+\.(?:partial|old)-(\d+)-\w+$")


def _staging_dir(out: Path) -> Path:
    parent = out.parent.resolve()
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _sweep_stale(parent)
        return _temporary_dir(out, "partial")
    except OSError as err:
        raise CompileError(f"cannot write to {parent} ({err.strerror}); choose a writable --output") from None


def _temporary_dir(out: Path, kind: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{os.getpid()}-", dir=out.parent.resolve()))


def _sweep_stale(parent: Path) -> None:
    """Remove what compiles killed before their cleanup (SIGKILL, a crash, power loss) left here."""
    for entry in parent.iterdir():
        match = _TEMPORARY.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not _alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _replace(staging: Path, out: Path) -> None:
    """Move the finished folder into place. An older artifact there is swapped with it in one step
    where the system can, so no moment leaves neither; the caller removes staging, then the old one."""
    if out.exists() and _exchange(staging, out):
        return
    old = None
    if out.exists():
        old = _temporary_dir(out, "old")
        os.replace(out, old / out.name)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically: Linux's renameat2(RENAME_EXCHANGE); False where it is missing or refused."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _build_model(role: str, ck: Checkpoint, cfg: ModelConfig, output_vocab_size: int, target: tvm.target.Target,
                 opts: CompileOptions, staging: Path, log: Callable[[str], None], kinds: dict[str, str],
                 extra_params: dict[str, np.ndarray]) -> ModelEntry:
    """kinds: each role's kind; a target whose draft is a feature draft exports its hidden states.
    extra_params are stored beside the weights for the runtime (an eagle draft's token ids)."""
    tile = weight_tile(model_target(target))
    quantization = _quantization(role, opts, tile, target)
    eagle = kinds[role] == KIND
    output_vocab_size = cfg.vocab_size if eagle else output_vocab_size
    log(f"convert: {role} weights ({kinds[role]}, {cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}) "
        f"to {opts.dtype}, quantization {quantization}")
    params, formats = convert_weights(cfg, ck, opts.dtype, output_vocab_size, tile, quantization)
    log(f"lower: {role} for {target.kind.name}" + (f" ({_count(formats)})" if formats else ""))
    layout = WeightLayout(tile, formats)
    features = opts.export_features if role == "target" else None
    if eagle:
        features = feature_layers(ck)
        model = EagleDraft(cfg, model_target(target), layout, features)
    else:
        model = CausalLM(cfg, model_target(target), output_vocab_size, layout, features)
    model.to(opts.dtype)
    mod, named_params = model.export_tvm(spec=model.get_default_spec())
    param_names = [name for name, _ in named_params]
    _check_shapes(params, named_params, role)
    log(f"build: {role} library (TVM {tvm.__version__})")
    start = time.perf_counter()
    with target:  # TVM's nvcc callback reads the architecture from the current target
        executable = tvm.compile(mod, target=target, relax_pipeline=pipeline_for(target),
                                 tir_pipeline=tir_pipeline_for(target))
    if target.kind.name == "cuda":
        from .cuda import check_device_code

        check_device_code(executable.mod)
    library = f"{role}-{opts.device}.so"
    _export(executable, staging / library, target)
    build_seconds = time.perf_counter() - start
    save_file({**params, **extra_params}, str(staging / f"{role}.safetensors"))
    return ModelEntry(
        kind=kinds[role],
        library=library,
        params=f"{role}.safetensors",
        param_names=tuple(param_names),
        config=cfg.to_json(),
        output_vocab_size=output_vocab_size,
        quantization=dict(formats),
        verify_row_blocks=tuple(model.verify_row_blocks),
        source=str(Path(ck.source).resolve()),  # reopened from anywhere (bench, train-draft)
        build_seconds=round(build_seconds, 1),
        param_bytes=int(sum(p.nbytes for p in params.values())),
        decode_bytes=int(sum(p.nbytes for name, p in params.items() if name != GATHERED_EMBEDDING)),
        feature_layers=features,
    )


def _quantization(role: str, opts: CompileOptions, tile: int | None, target: tvm.target.Target) -> str:
    """The role's choice; kept GGUF blocks need the CPU layout, so elsewhere "keep" expands them."""
    choice = opts.draft_quantization if role == "draft" and opts.draft_quantization else opts.quantization
    if tile is not None or choice in ("keep", "none"):
        return choice if tile is not None else "none"
    raise CompileError(f"--quantization {choice} needs the LLVM CPU layout, not {target.kind.name}; "
                       "compile with --quantization none for this device")


def _count(formats: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for fmt in formats.values():
        key = fmt if isinstance(fmt, str) else "+".join(fmt)  # a fused linear's parts in different formats
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} linears {fmt}" for fmt, n in sorted(counts.items()))


def _export(executable, path: Path, target) -> None:
    """The library at path. A CPU one links in cpu_attention.c, the functions its KV cache calls for the
    attention of multi-token forwards; -Bsymbolic binds their calls of the chunk kernels to this library's
    own, which a draft's library, loaded beside it, also defines. A C source library is a CPU one too: its
    model is built for LLVM (model_target), KV cache included."""
    if model_target(target).kind.name != "llvm":
        executable.export_library(str(path))
        return
    with tempfile.TemporaryDirectory() as work:
        executable.export_library(str(path), addons=[str(attention.glue_object(Path(work)))],
                                  options=["-Wl,-Bsymbolic"])


def _check_shapes(params: dict[str, np.ndarray], named_params, role: str) -> None:
    for name, param in named_params:
        want = tuple(int(s) for s in param.shape)
        if name not in params or params[name].shape != want:
            got = params[name].shape if name in params else "missing"
            raise CompileError(f"{role} weight {name}: shape {got}, model expects {want}; the checkpoint does not match its config.json")


def _write_config(staging: Path, target_ck: Checkpoint, configs: dict, models: dict[str, ModelEntry],
                  target: tvm.target.Target, opts: CompileOptions) -> None:
    config = ArtifactConfig(
        device=opts.device,
        target=_target_dict(target),
        dtype=opts.dtype,
        vocab_size=configs["target"].vocab_size,
        shared_vocab_size=min(c.vocab_size for c in configs.values()),
        special_tokens=special_tokens(target_ck, configs["target"]),
        chat_template=target_ck.tokenizer_config.get("chat_template"),
        build=BuildOptions(opts.max_seq_len, opts.page_size, opts.prefill_chunk_size,
                           opts.cuda_arch if opts.device == "cuda" else None),
        models=models,
        kernels=kernels.signatures(),
        cpu_features=required_cpu_features(target),
        files={},
        versions={"mlc_spec": _version(), "tvm": tvm.__version__, "python": platform.python_version()},
    )
    write_config(staging, with_files(config, staging))


def _target_dict(target: tvm.target.Target) -> dict:
    d = {"kind": target.kind.name}
    for key in ("mcpu", "arch"):
        if key in target.attrs:
            d[key] = str(target.attrs[key])
    return d


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mlc_spec")
    except PackageNotFoundError:
        return "unknown"
