"""How a variant was made, as typed records: the manifest's `variants.NAME.method`.

An export writes an ExportMethod, quantize() a QuantizeMethod (an embedding package's int8 keeps a
dict of its own). On disk they are the JSON objects manifests have always held (method_dict writes
the same keys in the same order), and `parse_method` reads those back, older manifests' missing keys
included. A method that is neither (a foreign folder's, or a hand-edited one of the wrong shape)
stays the plain dict it was: it only describes, so it never makes a package unreadable. Keys a
record does not know are kept in `extra` and written back, so a newer release's fields survive an
older release rewriting the manifest.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Union


@dataclass(frozen=True)
class ExportMethod:
    exporter: str
    timings_s: dict = field(default_factory=dict)  # step -> seconds
    # What the graph does per layer (exporter.architectures.describe_graph); absent from older manifests.
    graph: dict | None = field(default=None, metadata={"omit_if_none": True})
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class LmHeadMethod:
    bits: int  # 0: kept in the base's float type
    operator: str  # "MatMulNBits", or "Gemm (fp32)" when kept
    # MatMulNBits' accuracy level of the lm_head when it differs from the layers' (int4-exact: 4)
    accuracy_level: int | None = field(default=None, metadata={"omit_if_none": True})


@dataclass(frozen=True)
class EmbeddingMethod:
    bits: int
    operator: str  # "GatherBlockQuantized", or "Gather (fp32)" when kept
    shared_with_lm_head: bool = False  # one quantized tensor serves both (tied weights)


@dataclass(frozen=True)
class QualityTargets:
    max_size_ratio: float  # of the base's bytes
    max_ppl_increase: float
    min_top1: float
    # mean KL(base || variant) on the worst route; absent from manifests written before the KL target
    max_kl: float | None = field(default=None, metadata={"omit_if_none": True})


@dataclass(frozen=True)
class LosslessCheck:
    min_top1: float
    met: bool


@dataclass(frozen=True)
class QuantizeMethod:
    quantizer: str
    operator: str  # e.g. "com.microsoft.MatMulNBits"
    bits: int
    block_size: int
    symmetric: bool
    accuracy_level: int
    base: str = "fp32"  # the variant it was made from and measured against
    dtype: str = "float32"  # the base's float type, kept by the variant
    scales_dtype: str = "float32"
    lm_head: LmHeadMethod = LmHeadMethod(0, "Gemm (fp32)")
    embedding: EmbeddingMethod = EmbeddingMethod(0, "Gather (fp32)")
    exclude: tuple[str, ...] = ()  # the patterns asked for
    excluded: tuple[str, ...] = ()  # the nodes they (and bits=0) kept unquantized
    kept_8bit: tuple[str, ...] = ()
    lossless: bool = False  # every weight imported exactly from GGUF blocks
    gguf: dict | None = None  # what was imported from the source GGUF, and why the rest was not
    dynamic: dict | None = None  # int8-dynamic's smoothing and conversion report
    quality: dict | None = None  # the QualityReport against `base`
    targets: QualityTargets | None = None
    lossless_check: LosslessCheck | None = None
    size_ratio: float | None = None
    meets_targets: bool | None = None
    onnxruntime: str | None = None  # the version that quantized it
    seconds: float | None = None
    extra: dict = field(default_factory=dict)


Method = Union[ExportMethod, QuantizeMethod, dict]
_NESTED = {"lm_head": LmHeadMethod, "embedding": EmbeddingMethod, "targets": QualityTargets,
           "lossless_check": LosslessCheck}
_TUPLES = ("exclude", "excluded", "kept_8bit")
# The JSON type each field must have (bool is not an int here); None is allowed where the default is None.
_KINDS = {int: (int,), float: (int, float), str: (str,), bool: (bool,), dict: (dict,)}


def _record(cls, data: dict):
    """`cls` from `data`, or None when a field is missing or of the wrong JSON type."""
    kwargs, known = {}, set()
    for f in fields(cls):
        known.add(f.name)
        if f.name == "extra":
            continue
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                return None
            continue
        value = data[f.name]
        if value is None and f.default is not None:  # only optional fields may be null
            return None
        if f.name in _NESTED and value is not None:
            value = _record(_NESTED[f.name], value) if isinstance(value, dict) else None
            if value is None:
                return None
        elif f.name in _TUPLES:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                return None
            value = tuple(value)
        elif f.name not in _NESTED and not _type_ok(f.type, value):
            return None
        kwargs[f.name] = value
    unknown = {k: v for k, v in data.items() if k not in known}
    if "extra" in known:
        kwargs["extra"] = unknown
    elif unknown:  # a nested record has nowhere to keep them: the whole method stays a dict
        return None
    return cls(**kwargs)


def _type_ok(annotation: str, value: Any) -> bool:
    names = [part.strip() for part in annotation.split("|")]
    if value is None:
        return "None" in names
    for name in names:
        kind = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict}.get(name)
        if kind is not None and isinstance(value, _KINDS[kind]) and (kind is bool or not isinstance(value, bool)):
            return True
    return False


def parse_method(data: Any) -> Method:
    """The typed record a manifest's method dict describes; the dict itself when it is neither kind."""
    if not isinstance(data, dict):
        return data
    # quantize()'s records name the lm_head and embedding; other quantizers' (embedding packages') do not.
    ours = "quantizer" in data and "lm_head" in data and "embedding" in data
    cls = QuantizeMethod if ours else ExportMethod if "exporter" in data else None
    record = _record(cls, data) if cls is not None else None
    return data if record is None else record


def method_dict(method: Method) -> dict:
    """The JSON object a manifest stores for `method` (the keys and order manifests have always had)."""
    if isinstance(method, dict):
        return dict(method)
    out: dict = {}
    for f in fields(method):
        value = getattr(method, f.name)
        if f.name == "extra":
            out.update(value)
        elif value is None and f.metadata.get("omit_if_none"):
            continue
        elif f.name in _NESTED and value is not None:
            out[f.name] = {g.name: getattr(value, g.name) for g in fields(value)
                           if not (getattr(value, g.name) is None and g.metadata.get("omit_if_none"))}
        elif f.name in _TUPLES:
            out[f.name] = list(value)
        else:
            out[f.name] = value
    return out
