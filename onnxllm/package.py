"""Read, write and validate a model package; confine every path to the package folder.

A package is an HF-shaped folder: config.json, generation_config.json, tokenizer files,
chat_template.jinja, onnx/model*.onnx, genai_config.json, and `onnxllm.json` (the manifest), which
holds everything the runtime needs. Nothing is inferred from file names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import MISSING, asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from .errors import InvalidPackageError
from .methods import Method, method_dict, parse_method

MANIFEST = "onnxllm.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Architecture:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    context_length: int
    parameters: int


@dataclass(frozen=True)
class IOSpec:
    input_ids: str = "input_ids"
    attention_mask: str = "attention_mask"
    position_ids: str | None = "position_ids"  # None: the graph computes positions from the mask
    past_key: str = "past_key_values.{}.key"
    past_value: str = "past_key_values.{}.value"
    logits: str = "logits"
    present_key: str = "present.{}.key"
    present_value: str = "present.{}.value"
    logits_to_keep: str | None = None  # optional input: logits for the last N positions only
    use_cache_branch: str | None = None  # optional input of optimum's merged decoders: True once there is a past


@dataclass(frozen=True)
class KVCacheSpec:
    layout: str = "batch,kv_heads,sequence,head_dim"  # the axes of each past/present tensor, in order
    dtype: str = "float32"
    # GroupQueryAttention accepts past and present bound to one preallocated buffer.
    shared_buffer: bool = True
    # LongRoPE (Phi-3.5, Phi-4-mini) rotates every position with other factors once the sequence is longer
    # than this: a pass that crosses it recomputes the whole cache, as transformers does. 0: never.
    recompute_past_at: int = 0


@dataclass(frozen=True)
class Variant:
    file: str  # relative to the package root
    scheme: str  # fp32 | fp16 | int8 | int4 | int8-dynamic
    dtype: str  # activation/KV dtype of the graph
    bytes: int
    method: Method = field(default_factory=dict)  # how it was made (methods.py): exporter, or quantizer, bits...
    # A graph whose I/O differs from the package's (variants read from a foreign folder): None, the package's.
    io: IOSpec | None = None
    kv_cache: KVCacheSpec | None = None


@dataclass(frozen=True)
class EmbeddingSpec:
    """What an embedding package's graph computes and how its inputs are made (kind == "embedding")."""

    pooling: str  # mean | cls | lasttoken: applied in the graph, over the attention mask
    normalize: bool  # L2-normalize by default (sentence-transformers' Normalize module was present)
    dimension: int  # length of one vector
    max_tokens: int  # longest input the model takes, special tokens included; longer texts are truncated
    pad_token_id: int = 0
    inputs: tuple[str, ...] = ("input_ids", "attention_mask")  # int64 (batch, sequence) each
    output: str = "sentence_embedding"  # float32 (batch, dimension), before normalization


EMBEDDING_POOLING = ("mean", "cls", "lasttoken")


@dataclass(frozen=True)
class Manifest:
    format_version: int
    exporter_version: str
    source: dict
    architecture: Architecture
    io: IOSpec
    kv_cache: KVCacheSpec
    variants: dict[str, Variant]
    default_variant: dict[str, str]  # device -> variant name
    eos_token_ids: list[int]
    bos_token_id: int | None = None
    add_bos_token: bool = False
    tokenizer: str = "tokenizer.json"
    chat_template: str | None = None  # file name, or None when the model has none
    generation: dict = field(default_factory=dict)
    verification: dict = field(default_factory=dict)
    format: str = "onnxllm"
    kind: str = "decoder"  # decoder (generates text) | embedding (text -> one vector)
    embedding: EmbeddingSpec | None = None  # set when kind == "embedding"

    def to_json(self) -> str:
        data = asdict(self)
        for name, variant in self.variants.items():  # the typed records, as the JSON they have always been
            data["variants"][name]["method"] = method_dict(variant.method)
        for v in data["variants"].values():  # written only where a variant has its own
            for key in ("io", "kv_cache"):
                if v[key] is None:
                    del v[key]
        return json.dumps(data, indent=2, sort_keys=False) + "\n"

    def with_variant(self, name: str, variant: Variant, *, default_for: tuple[str, ...] = ()) -> "Manifest":
        variants = {**self.variants, name: variant}
        defaults = {**self.default_variant, **{dev: name for dev in default_for}}
        return _replace(self, variants=variants, default_variant=defaults)


def _replace(m: Manifest, **changes) -> Manifest:
    from dataclasses import replace

    return replace(m, **changes)


def _require(data: dict, key: str, kind, where: str):
    if key not in data:
        raise InvalidPackageError(
            f"manifest {where}: field '{key}' is missing; re-export the model with `onnxllm export`")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidPackageError(f"manifest {where}: field '{key}' has the wrong type ({type(value).__name__})")
    return value


# Types the parser enforces, so a hand-edited or hostile manifest fails here, not deep in the runtime.
_FIELD_TYPES = {
    **{("IOSpec", f): str for f in ("input_ids", "attention_mask", "past_key", "past_value", "logits",
                                   "present_key", "present_value")},
    **{("IOSpec", f): (str, type(None)) for f in ("position_ids", "logits_to_keep", "use_cache_branch")},
    ("KVCacheSpec", "layout"): str, ("KVCacheSpec", "dtype"): str, ("KVCacheSpec", "shared_buffer"): bool,
    ("KVCacheSpec", "recompute_past_at"): int,
    ("Variant", "file"): str, ("Variant", "scheme"): str, ("Variant", "dtype"): str, ("Variant", "bytes"): int,
    ("Variant", "method"): dict, ("Architecture", "model_type"): str,
    ("EmbeddingSpec", "pooling"): str, ("EmbeddingSpec", "normalize"): bool, ("EmbeddingSpec", "dimension"): int,
    ("EmbeddingSpec", "max_tokens"): int, ("EmbeddingSpec", "pad_token_id"): int, ("EmbeddingSpec", "inputs"): list,
    ("EmbeddingSpec", "output"): str,
}


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise InvalidPackageError(f"manifest {where}: expected an object, got {type(data).__name__}")
    kwargs = {}
    for name, f in cls.__dataclass_fields__.items():
        required = f.default is f.default_factory is MISSING
        if name in data:
            kwargs[name] = data[name]
        elif required:
            _require(data, name, object, where)
    for name, value in kwargs.items():
        kind = _FIELD_TYPES.get((cls.__name__, name))
        if kind is not None and (not isinstance(value, kind) or (isinstance(value, bool) and kind is int)):
            raise InvalidPackageError(f"manifest {where}: field '{name}' has the wrong type ({type(value).__name__})")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise InvalidPackageError(f"manifest {where}: {exc}") from None


def parse_manifest(data: Any) -> Manifest:
    """Validate a decoded manifest; every problem is an InvalidPackageError naming the field."""
    if not isinstance(data, dict):
        raise InvalidPackageError("manifest: expected a JSON object; re-export the model with `onnxllm export`")
    version = _require(data, "format_version", int, "")
    if version > FORMAT_VERSION:
        raise InvalidPackageError(
            f"manifest format version {version} is newer than this onnxllm understands ({FORMAT_VERSION}); "
            "upgrade onnxllm (pip install -U onnxllm)"
        )
    arch = _build(Architecture, _require(data, "architecture", dict, ""), "architecture")
    for name in Architecture.__dataclass_fields__:
        if name != "model_type" and (not isinstance(getattr(arch, name), int) or getattr(arch, name) < 0):
            raise InvalidPackageError(f"manifest architecture: '{name}' must be a non-negative integer")
    variants_raw = _require(data, "variants", dict, "")
    if not variants_raw:
        raise InvalidPackageError("manifest: no variants listed; re-export the model with `onnxllm export`")
    variants = {}
    for name, raw in variants_raw.items():
        if isinstance(raw, dict) and (raw.get("io") is not None or raw.get("kv_cache") is not None):
            raw = {**raw, "io": _build(IOSpec, raw["io"], f"variants.{name}.io") if raw.get("io") else None,
                   "kv_cache": _build(KVCacheSpec, raw["kv_cache"], f"variants.{name}.kv_cache")
                   if raw.get("kv_cache") else None}
        v = _build(Variant, raw, f"variants.{name}")
        v = replace(v, method=parse_method(v.method))
        if not isinstance(v.file, str) or not isinstance(v.scheme, str) or not isinstance(v.bytes, int):
            raise InvalidPackageError(f"manifest variants.{name}: 'file', 'scheme' and 'bytes' have the wrong type")
        variants[str(name)] = v
    defaults = _require(data, "default_variant", dict, "")
    for dev, name in defaults.items():
        if not isinstance(name, str) or name not in variants:
            raise InvalidPackageError(f"manifest default_variant.{dev} names {name!r}, which is not among the variants")
    eos = _require(data, "eos_token_ids", list, "")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in eos):
        raise InvalidPackageError("manifest: 'eos_token_ids' must be a list of integers")
    rest = {k: data[k] for k in ("bos_token_id", "add_bos_token", "tokenizer", "chat_template", "generation",
                                 "verification", "format") if k in data}
    if rest.get("bos_token_id") is not None and (
            not isinstance(rest["bos_token_id"], int) or isinstance(rest["bos_token_id"], bool)):
        raise InvalidPackageError("manifest: 'bos_token_id' must be an integer or null")
    if not isinstance(rest.get("format", "onnxllm"), str):
        raise InvalidPackageError("manifest: 'format' must be a string")
    for key, kind in (("tokenizer", str), ("generation", dict), ("verification", dict), ("add_bos_token", bool)):
        if key in rest and not isinstance(rest[key], kind):
            raise InvalidPackageError(f"manifest: field '{key}' has the wrong type ({type(rest[key]).__name__})")
    if rest.get("chat_template") is not None and not isinstance(rest["chat_template"], str):
        raise InvalidPackageError("manifest: field 'chat_template' must be a file name or null")
    kind, embedding = _parse_kind(data)
    return Manifest(
        format_version=version,
        exporter_version=str(data.get("exporter_version", "unknown")),
        source=data.get("source") if isinstance(data.get("source"), dict) else {},
        architecture=arch,
        io=_build(IOSpec, data.get("io", {}), "io"),
        kv_cache=_build(KVCacheSpec, data.get("kv_cache", {}), "kv_cache"),
        variants=variants,
        default_variant={str(k): str(v) for k, v in defaults.items()},
        eos_token_ids=list(eos),
        kind=kind,
        embedding=embedding,
        **rest,
    )


def _parse_kind(data: dict) -> tuple[str, EmbeddingSpec | None]:
    kind = data.get("kind", "decoder")
    if kind not in ("decoder", "embedding"):
        raise InvalidPackageError(f"manifest: 'kind' must be 'decoder' or 'embedding', got {kind!r}")
    if kind == "decoder" and data.get("embedding") is None:
        return kind, None
    spec = _build(EmbeddingSpec, data.get("embedding"), "embedding")
    if spec.pooling not in EMBEDDING_POOLING:
        raise InvalidPackageError(
            f"manifest embedding: pooling {spec.pooling!r} is not one of {', '.join(EMBEDDING_POOLING)}")
    if spec.dimension < 1 or spec.max_tokens < 2 or not all(isinstance(n, str) for n in spec.inputs):
        raise InvalidPackageError("manifest embedding: 'dimension', 'max_tokens' or 'inputs' is out of range")
    from dataclasses import replace

    return kind, replace(spec, inputs=tuple(spec.inputs))


def safe_path(root: str | os.PathLike, relative: str) -> Path:
    """`root/relative`, refusing absolute paths, `..` and symlinks that leave the package folder."""
    if not isinstance(relative, str) or not relative or os.path.isabs(relative) or "\x00" in relative:
        raise InvalidPackageError(
            f"unsafe path {relative!r} in the package: paths must be relative to the package folder")
    base = Path(root).resolve()
    target = (base / relative).resolve()
    if target != base and base not in target.parents:
        raise InvalidPackageError(f"unsafe path {relative!r} in the package: it leads outside {base}")
    return target


def read_manifest(root: str | os.PathLike) -> Manifest:
    path = Path(root) / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidPackageError(
            f"{root} has no {MANIFEST}: export a model with `onnxllm export SOURCE -o {root}`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidPackageError(f"cannot read {path}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidPackageError(f"{path} is not valid JSON ({exc}); re-export the model") from None
    manifest = parse_manifest(data)
    for v in manifest.variants.values():
        safe_path(root, v.file)
    for f in (manifest.tokenizer, manifest.chat_template):
        if f is not None:
            safe_path(root, f)
    _check_genai_config(Path(root))
    return manifest


def _check_genai_config(root: Path) -> None:
    """genai_config.json is read by other runtimes: its model file must stay inside the package too."""
    path = root / "genai_config.json"
    if not path.is_file():
        return
    try:
        decoder = json.loads(path.read_text(encoding="utf-8"))["model"]["decoder"]
        filename = decoder.get("filename") if isinstance(decoder, dict) else None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise InvalidPackageError(f"{path} is not a valid genai_config.json; re-export the package") from None
    if filename is not None:
        safe_path(root, filename)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write to a temp file beside `path`, then rename: readers see the old or the new file, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_can_create(path: str | os.PathLike, *, fix: str = "choose another folder") -> None:
    """Fail at once, naming `path`, when it cannot be created (or replaced) in its folder; creates nothing.

    Called before minutes of loading and converting, so a bad -o fails in a second, not at save.
    Probes the nearest existing folder above `path` with a real temp folder: permission bits say
    nothing for root or on read-only mounts.
    """
    path = Path(path).absolute()
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InvalidPackageError(f"cannot create {path}: {existing} is not a folder; {fix}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".onnxllm-probe.", dir=existing))
    except OSError as exc:
        raise InvalidPackageError(
            f"cannot create {path}: cannot write to {existing} ({exc.strerror or exc}); {fix}") from None


def write_manifest(root: str | os.PathLike, manifest: Manifest) -> None:
    write_text_atomic(Path(root) / MANIFEST, manifest.to_json())


@contextlib.contextmanager
def staging_dir(final: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `final`; rename it to `final` only when the block succeeds.

    On any error (or Ctrl-C) the temp folder is removed and whatever was at `final` is untouched.
    With `force`, an existing package (or an empty folder) is replaced only after the new one is
    complete; any other existing folder is refused, so a typo in -o never deletes a user's files.
    """
    final = Path(final).absolute()
    if final.exists():
        if not force:
            raise InvalidPackageError(f"{final} already exists; pass --force (force=True) to overwrite it")
        if not final.is_dir() or not ((final / MANIFEST).is_file() or not any(final.iterdir())):
            raise InvalidPackageError(
                f"{final} exists and is not an onnxllm package; --force only replaces a package: choose another folder"
            )
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
        # mkdtemp makes it owner-only; the package gets the mode of the folder it is written into.
        os.chmod(tmp, final.parent.stat().st_mode & 0o777)
    except OSError as exc:
        raise InvalidPackageError(
            f"cannot write to {final.parent}: {exc.strerror or exc}; choose another output folder") from None
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)  # put the previous package back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def exclusive(lock_path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock across processes (two exports into one cache folder, two quantizes of
    one package). POSIX flock; where it is missing (Windows) the block runs unlocked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def save_onnx(model, path: str | os.PathLike) -> None:
    """Write an ONNX model with its weights in external data beside it (`NAME.data`), as genai and optimum do.

    Loading then skips a protobuf copy of every weight: measured on SmolLM2 int8, load 0.49 -> 0.28 s and
    44 MiB less peak memory than the same graph with inline weights (beyond 2 GB inline is not possible).
    Small tensors stay inline (size_threshold): ORT's shape inference needs constants like axes."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    # onnx creates the data file owner-only (0600); give it the graph file's mode (the user's umask), so a
    # package others can read stays readable as a whole.
    data = path.with_name(path.name + ".data")
    if data.exists():
        os.chmod(data, path.stat().st_mode & 0o777)


def load_onnx(path: str | os.PathLike):
    """An ONNX model with its external data read in. onnx (>= 1.19) refuses a data file with more than one
    hard link, which is what `onnxllm import` makes of another tool's folder, so the tensors are read here:
    each from its (safe) location, offset and length beside the graph."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    handles: dict[Path, object] = {}
    try:
        for tensor in _get_all_tensors(model):
            if not uses_external_data(tensor):
                continue
            info = ExternalDataInfo(tensor)
            source = safe_path(path.parent, info.location)
            handle = handles.get(source) or handles.setdefault(source, open(source, "rb"))
            handle.seek(int(info.offset or 0))
            tensor.raw_data = handle.read(int(info.length)) if info.length else handle.read()
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
    finally:
        for handle in handles.values():
            handle.close()
    return model


def onnx_bytes(path: str | os.PathLike) -> int:
    """Size of an .onnx file plus its external data file, if any."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return (path.stat().st_size if path.is_file() else 0) + (data.stat().st_size if data.is_file() else 0)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def find_package_root(path: str | os.PathLike) -> Path:
    """A package folder from a folder or from a path to an .onnx file inside it (beside or above)."""
    p = Path(path)
    if not p.exists():
        raise InvalidPackageError(f"{path} does not exist")
    start = p if p.is_dir() else p.parent
    for candidate in (start, *start.parents[:2]):
        if (candidate / MANIFEST).is_file():
            return candidate
    if p.is_dir():
        raise InvalidPackageError(
            f"{path} has no {MANIFEST} and is not an onnxllm package; "
            f"export one with `onnxllm export SOURCE -o {path}`"
        )
    raise InvalidPackageError(
        f"no {MANIFEST} found beside or above {path}; point at a package made by `onnxllm export`"
    )
