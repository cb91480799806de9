"""The artifact folder: mlc_spec_config.json, typed and versioned, written by the compiler and read by the runtime.

The folder holds the config, tokenizer.json, and per model (target, draft) a compiled library and its
parameters. The config records every file's size and sha256, so a damaged artifact is refused with one
line naming the file instead of crashing the process that loads it, and the kernels' signatures, from
which the runtime makes its typed kernel calls. FORMAT_VERSION changes whenever a field's meaning does;
the runtime reads only its own version and says to recompile anything else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path

CONFIG_FILE = "mlc_spec_config.json"
# 2: typed schema with kernel signatures, per-file sizes and hashes, and the CPU features the code needs.
# 3: each model records decode_bytes, the parameter bytes one decode step reads.
# 4: CPU libraries attend multi-token forwards through the runtime's CPU_ATTENTION_* functions.
# 5: an eagle draft's batch_decode_target reads the target's features (fused over feature_layers), its
#    batch_decode only its own.
# 6: CPU libraries carry their multi-token attention (compile/cpu_attention.c), which the runtime no
#    longer registers.
FORMAT_VERSION = 6
DEVICES = ("cpu", "cuda", "vulkan", "metal", "opencl", "webgpu")
VOCAB = "vocab"  # the dimension of a kernel tensor that is the model's output vocabulary
CPU_PAGE_SIZE = 16  # TVM's CPU attention kernels fix the page size, and the chunk kernels' block is one page


class ArtifactError(ValueError):
    """An artifact folder that cannot be loaded, reported as one line with the fix."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A kernel argument or result. Each dimension is named: by a symbol the arguments bind, that symbol
    plus a constant ("batch+1"), or VOCAB. A result marked host is copied back: the loop branches on it."""
    name: str
    dtype: str
    shape: tuple[str, ...]
    host: bool = False


@dataclasses.dataclass(frozen=True)
class KernelSignature:
    name: str
    args: tuple[TensorSpec, ...]
    results: tuple[TensorSpec, ...]

    def result_shapes(self, arg_shapes: list[tuple]) -> list[tuple]:
        """The results' shapes given the arguments' (ints, or the compiler's symbolic sizes)."""
        bound = [(split_dim(dim), size) for arg, shape in zip(self.args, arg_shapes) for dim, size in zip(arg.shape, shape)]
        sizes = {}
        # A symbol some argument has as it is ("batch") wins over one derived from "batch+1": the size
        # the kernel's own buffers bind it to.
        for (symbol, offset), size in sorted(bound, key=lambda b: b[0][1] != 0):
            sizes.setdefault(symbol, size - offset if offset else size)
        return [tuple(sizes[split_dim(dim)[0]] for dim in result.shape) for result in self.results]


def split_dim(dim: str) -> tuple[str, int]:
    """"batch+1" -> ("batch", 1); "n" -> ("n", 0)."""
    symbol, _, offset = dim.partition("+")
    return symbol, int(offset or 0)


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    max_seq_len: int
    page_size: int
    prefill_chunk_size: int
    cuda_arch: str | None


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    bos_token: str | None
    eos_token: str | None


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One compiled model: its library, its parameters in call order, and how it was built."""
    library: str
    params: str
    param_names: tuple[str, ...]
    config: dict  # compile/config.py's ModelConfig as JSON
    output_vocab_size: int
    quantization: dict  # parameter prefix -> format (or one per fused part, when they differ), for the quantized linears
    verify_row_blocks: tuple[int, ...]  # the extra verify_<n> functions
    source: str
    build_seconds: float
    param_bytes: int
    decode_bytes: int  # param_bytes less the gathered embedding table, of which a token reads one row
    # "model": a causal LM over token ids; "eagle": a feature draft over the target's embeddings and
    # hidden states (compile/eagle.py), whose target then exports them
    kind: str = "model"
    # the target layers whose outputs precede the last hidden state in the features a target exports
    # (None: it exports none) or an eagle draft reads
    feature_layers: tuple[int, ...] | None = None

    @property
    def embed_vocab_size(self) -> int:
        return int(self.config["vocab_size"])


@dataclasses.dataclass(frozen=True)
class FileRecord:
    size: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class ArtifactConfig:
    device: str
    target: dict  # the TVM target: kind, and mcpu or arch
    dtype: str
    vocab_size: int
    shared_vocab_size: int
    special_tokens: SpecialTokens
    chat_template: str | None
    build: BuildOptions
    models: dict[str, ModelEntry]  # "target", and "draft" when there is one
    kernels: tuple[KernelSignature, ...]
    cpu_features: tuple[str, ...]  # numpy's names of the host CPU features the compiled code uses
    files: dict[str, FileRecord]
    versions: dict
    format: int = FORMAT_VERSION

    @property
    def has_draft(self) -> bool:
        return "draft" in self.models

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict, where: str) -> "ArtifactConfig":
        if not isinstance(data, dict):
            raise ArtifactError(f"{where}: {CONFIG_FILE} is not a JSON object; recompile with `mlc_spec compile`")
        if data.get("format") != FORMAT_VERSION:
            raise ArtifactError(f"{where} was written by another version of mlc_spec (artifact format "
                                f"{data.get('format')!r}, this one reads {FORMAT_VERSION}); recompile it with `mlc_spec compile`")
        try:
            return _typed(cls, data)
        except (KeyError, TypeError, ValueError) as err:
            raise ArtifactError(f"{where}: {CONFIG_FILE} is damaged ({err}); recompile with `mlc_spec compile`") from None


def _typed(hint, value):
    """value (parsed JSON) as the type hint says: dataclasses by field, tuples and dicts by item."""
    origin, params = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise TypeError(f"{hint.__name__} is not an object")
        hints = typing.get_type_hints(hint)
        fields = [f for f in dataclasses.fields(hint) if f.name in value or f.default is dataclasses.MISSING]
        return hint(**{f.name: _typed(hints[f.name], value[f.name]) for f in fields})
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in params:
            return None
        return _typed(next(p for p in params if p is not type(None)), value)
    if origin is tuple:
        return tuple(_typed(params[0], item) for item in _checked(value, list, hint))
    if origin is dict:
        return {str(k): _typed(params[1], v) for k, v in _checked(value, dict, hint).items()}
    return _checked(value, hint, hint)


def _checked(value, kind, hint):
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise TypeError(f"{value!r:.40} is not {getattr(hint, '__name__', hint)}")
    return value


def file_records(folder: Path) -> dict[str, FileRecord]:
    """Size and sha256 of every file in the folder but the config itself."""
    return {p.name: FileRecord(p.stat().st_size, sha256(p))
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != CONFIG_FILE}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_config(folder: Path, config: ArtifactConfig) -> None:
    (folder / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2))


def is_artifact(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file()


def read_artifact(folder: Path, check_hashes: bool = False) -> ArtifactConfig:
    """The folder's config, once every recorded file is there at its size (and hash, when asked):
    a truncated library would otherwise crash the process that maps it (SIGBUS), not raise."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ArtifactError(f"{folder}: not an mlc_spec artifact (no {CONFIG_FILE}); compile one with `mlc_spec compile`")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{path}: not valid JSON ({err}); recompile with `mlc_spec compile`") from None
    config = ArtifactConfig.from_json(data, str(folder))
    for name, record in config.files.items():
        _check_file(folder / name, record, check_hashes)
    return config


def _check_file(path: Path, record: FileRecord, check_hash: bool) -> None:
    fix = "recompile the artifact with `mlc_spec compile`"
    if not path.is_file():
        raise ArtifactError(f"{path}: missing from the artifact; {fix}")
    if path.stat().st_size != record.size:
        raise ArtifactError(f"{path}: {path.stat().st_size} bytes, the artifact recorded {record.size} "
                            f"(truncated or replaced); {fix}")
    if check_hash and sha256(path) != record.sha256:
        raise ArtifactError(f"{path}: its sha256 is not the one the artifact recorded (damaged or replaced); {fix}")


def with_files(config: ArtifactConfig, folder: Path) -> ArtifactConfig:
    """The config with the folder's files recorded: the compiler's last step before writing it."""
    return dataclasses.replace(config, files=file_records(folder))

