"""quantize(): add an int8, int4 or int8-dynamic variant to a package, next to its base model, all or nothing.

    MatMul(x, W)                -> MatMulNBits(x, q, scales)            ONNX Runtime's quantizer, or GGUF blocks
                                   [+ (x @ block_sum) @ offset^T]       GGUF Q4_1 only, see schemes.py
    Gemm(h, E, transB) lm_head  -> MatMulNBits(h, qE, sE)               MatMulNBits computes A @ B^T: E as it is
    Gather(E, ids) embedding    -> GatherBlockQuantized(qE, ids, sE)    the same qE when E is tied to the lm_head

The base is the fp32 variant, or the fp16 one (a `--dtype float16` export, for CUDA) when there is no
fp32: its weights are quantized in float32 and the scales written in float16, so the variant keeps
the base's float16 activations and KV cache (its dtype), and is compared with the fp16 model.

The base model is only read. The new .onnx is written into a temp folder, evaluated, moved into
place, and the manifest is written last; any failure (or Ctrl-C) restores the package as it was.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import QuantizeError
from ..methods import EmbeddingMethod, LmHeadMethod, LosslessCheck, QualityTargets, QuantizeMethod
from ..package import (MANIFEST, Variant, check_can_create, load_onnx, onnx_bytes, read_manifest, safe_path,
                       write_manifest)
from ..package import save_onnx as _save
from .fidelity import ROUTE_SAMPLE, routes_round_alike
from .gguf_blocks import GGUFBlocks, find_source_gguf, matches_dense, parts_of
from .quality import (
    CORPUS_TOKENS,
    QUALITY_FILE,
    DecoderRunner,
    QualityReport,
    base_variant,
    save_quality,
    score_file,
)
from .schemes import (
    BLOCK,
    LOSSLESS_MIN_TOP1,
    MS_DOMAIN,
    SCHEMES,
    WARN_TOP1,
    BlockWeight,
    Prepare,
    Scheme,
    ort_quantizer,
    quantize_rows,
    replacement_nodes,
)
from .staging import Commit
from .targets import _find_targets, _matches, _Target  # noqa: F401 (tests build _Target)

Progress = Callable[[str], None]
# Float types a base variant may have: (ONNX element type, numpy type).
_FLOAT_TYPES = {"float32": (1, np.float32), "float16": (10, np.float16)}
# Devices a quantized variant that meets its targets becomes the default for, by its float type: a
# float16 graph runs on CPU, but slowly (ORT converts around most CPU kernels); CUDA needs float16.
_DEFAULT_DEVICES = {"float32": ("cpu",), "float16": ("cuda", "dml")}


@dataclass(frozen=True)
class QuantizeOptions:
    """How quantize() builds a variant; every field is checked by `validate` before anything is read.

    `exclude`: node names or fnmatch patterns (e.g. "/model/layers.0/*") kept unquantized.
    `from_gguf`: "auto" imports the GGUF's blocks whose type has the scheme's width (int4: Q4_0, Q4_1,
    Q4_K, Q3_K, Q2_K; int8: Q8_0, Q5_*, Q6_K; the gguf scheme: all) exactly when the package came from
    a GGUF that is still here; True requires it; False always re-quantizes the base's weights.
    `lm_head_bits` / `embed_bits`: 8, 4 or 0 (unquantized); None takes the scheme's (measured) choice.
    `evaluate`: compare with the base on `eval_tokens` tokens of the fidelity corpus and decide the default.
    """

    block_size: int = 32
    symmetric: bool = True
    exclude: tuple[str, ...] = ()
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 activations (fast on CPU), 1 = fp32 (exact, slow)
    evaluate: bool = True
    force: bool = False  # rebuild the variant if it exists
    from_gguf: bool | Literal["auto"] = "auto"
    lm_head_bits: int | None = None
    embed_bits: int | None = None
    eval_tokens: int = CORPUS_TOKENS

    def validate(self) -> "QuantizeOptions":
        if isinstance(self.exclude, str):
            raise QuantizeError(f"exclude takes a list of patterns, not the string {self.exclude!r}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise QuantizeError(f"block_size must be a power of two, at least 16 (got {self.block_size})")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise QuantizeError(f"accuracy_level must be 0..4 (got {self.accuracy_level})")
        if any(bits not in (None, 0, 4, 8) for bits in (self.lm_head_bits, self.embed_bits)):
            raise QuantizeError("lm_head_bits and embed_bits must be 8, 4 or 0 (unquantized)")
        return self


@dataclass(frozen=True)
class QuantizeResult:
    variant: str
    file: Path  # absolute path of the new .onnx
    bytes: int
    size_ratio: float  # of the base model
    method: QuantizeMethod  # what the manifest records
    quality: QualityReport | None
    meets_targets: bool | None  # None when not evaluated
    default_for: tuple[str, ...]  # devices it became the default for
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    base: str = "fp32"  # the variant it was made from and compared with (fp32, or fp16)

    def __str__(self) -> str:
        m = self.method
        full = 16 if m.dtype == "float16" else 32
        how = f"{m.bits}-bit, block {m.block_size}, lm_head/embedding {m.lm_head.bits or full}-bit"
        gguf = m.gguf or {}
        if self.variant in SCHEMES and SCHEMES[self.variant].native_gguf:
            how = "each weight as the GGUF holds it (" + ", ".join(f"{k} {n}" for k, n in gguf["types"].items()) + ")"
        if m.lossless:
            how += f", imported losslessly from {gguf.get('file')}"
        elif gguf.get("used"):
            how += f", {gguf.get('imported')} weights imported from {gguf.get('file')}, the rest re-quantized"
        size = f"{self.bytes / 2**20:.1f} MiB ({self.size_ratio:.1%} of {self.base})"
        lines = [f"{self.variant}: {self.file.name}, {size}; {how}"]
        if self.quality is not None:
            lines.append(f"  vs {self.base} on {self.quality.tokens} tokens: {self.quality.summary()}")
            lines.append("  meets its targets: " + ("yes, now the default for " + ", ".join(self.default_for)
                                                    if self.meets_targets else "no, not made the default"))
        lines += [f"  {w}" for w in self.warnings]
        return "\n".join(lines)




def _import_gguf(targets: list[_Target], blocks: GGUFBlocks, block_size: int, dtype=np.float32,
                 base: str = "fp32", native: bool = False) -> dict:
    """Attach GGUF block weights to the targets that can take them exactly; say why for the others.

    `native`: each weight at the bits its GGUF type needs (the gguf scheme), not the target's. The
    GGUF's own (sub-)block size is kept: 16 or 32, whatever `block_size` the other weights get.
    """
    imported: dict[str, str] = {}
    requantized: dict[str, str] = {}
    cache: dict[tuple[str, int], BlockWeight | list[BlockWeight] | Exception] = {}
    for t in targets:
        key = (t.weight, 0 if native else t.bits)
        if key not in cache:
            try:
                cache[key] = blocks.weight(t.weight, None if native else t.bits, exact=native)
            except KeyError as exc:
                cache[key] = exc
        bw = cache[key]
        if isinstance(bw, Exception):
            requantized[t.node.name] = str(bw).strip("'\"")
        elif block_size != BLOCK and not native:
            requantized[t.node.name] = (
                f"GGUF blocks hold {parts_of(bw)[0].block_size} weights, block_size is {block_size}"
            )
        elif t.kind == "embedding" and isinstance(bw, list):
            requantized[t.node.name] = "the embedding's GGUF parts differ in layout"
        else:
            ok, diff = matches_dense(bw, t.dense, dtype, exact=native)
            if not ok:  # the export is the reference: never import blocks that disagree with it
                requantized[t.node.name] = f"GGUF blocks differ from the exported {base} weight by {diff:.3g}"
            else:
                t.block = bw
                t.bits = max(p.bits for p in parts_of(bw))
                imported[t.node.name] = "+".join(sorted({p.source for p in parts_of(bw)}))
    types: dict[str, int] = {}
    for source in imported.values():
        types[source] = types.get(source, 0) + 1
    reasons: dict[str, dict] = {}  # grouped, so 120 identical lines read as one
    for node, reason in requantized.items():
        reasons.setdefault(reason, {"count": 0, "first": node})["count"] += 1
    return {"file": blocks.path.name, "imported": len(imported), "types": dict(sorted(types.items())),
            "requantized": len(requantized), "requantized_because": reasons,
            "file_types": blocks.type_counts(), "reasons_by_node": requantized}


def _requantize_matmuls(model, targets: list[_Target], bits: int, block_size: int, symmetric: bool,
                        accuracy_level: int, dtype=np.float32):
    """ONNX Runtime's own MatMulNBitsQuantizer, on exactly the MatMuls in `targets`.

    It takes float16 weights as they are (its C++ kernel quantizes them in float32 and writes float16
    scales; symmetric: the same q and scales as quantizing the widened weight, checked); the scales
    are still cast to `dtype` here should another ONNX Runtime write them otherwise.
    """
    from onnx import numpy_helper

    names = {t.node.name for t in targets}
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in names]
    with ort_quantizer() as ortq:
        quantizer = ortq.MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                              accuracy_level=accuracy_level or None, nodes_to_exclude=others,
                                              op_types_to_quantize=("MatMul",))
        quantizer.process()
    model = quantizer.model.model
    floats = {t.weight + "_scales" for t in targets} | {t.weight + "_zero_points" for t in targets}
    for i, tensor in enumerate(model.graph.initializer):
        if tensor.name in floats and tensor.data_type in (1, 10, 16):  # float, float16, bfloat16
            array = numpy_helper.to_array(tensor)
            if array.dtype != np.dtype(dtype):
                model.graph.initializer[i].CopyFrom(numpy_helper.from_array(array.astype(dtype), tensor.name))
    return model


def _build(model, targets: list[_Target], *, block_size: int, symmetric: bool, accuracy_level: int,
           dtype=np.float32, head_level: int | None = None):
    """Rewrite `model` in place: every target becomes its quantized form; unused float weights go.

    `dtype`: the graph's float type (float32 or float16), that of the scales and offsets written.
    `head_level`: the lm_head's accuracy level, when not `accuracy_level`.
    """
    by_bits: dict[int, list[_Target]] = {}
    for t in targets:
        if t.kind == "linear" and t.block is None:
            by_bits.setdefault(t.bits, []).append(t)
    for bits, group in by_bits.items():
        model = _requantize_matmuls(model, group, bits, block_size, symmetric, accuracy_level, dtype)
    shared: dict = {}
    replaced: dict[str, list] = {}
    for t in sorted(targets, key=lambda t: t.kind != "lm_head"):  # lm_head first: the embedding reuses it
        if t.kind == "linear" and t.block is None:
            continue
        if isinstance(t.block, list):  # GGUF parts of different layouts: one MatMulNBits each, concatenated
            replaced[t.node.name] = _part_nodes(model, t, accuracy_level, shared, dtype)
            continue
        bw, prior = t.block, shared.get((t.weight, t.bits))
        if bw is None:  # a Gather cannot apply Q4_1 offsets: it gets its own tensor then
            usable = prior is not None and (t.kind != "embedding" or prior.offset is None)
            bw = prior if usable else quantize_rows(t.dense, t.bits, block_size=block_size, symmetric=symmetric)
        level = head_level if t.kind == "lm_head" and head_level is not None else accuracy_level
        replaced[t.node.name] = replacement_nodes(model, t.kind, t.node, t.weight, bw, level, shared, dtype)
    nodes = []
    for node in model.graph.node:
        nodes.extend(replaced.get(node.name, [node]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for node in model.graph.node for i in node.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        from onnx import helper

        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model


def _part_nodes(model, t: _Target, accuracy_level: int, shared: dict, dtype) -> list:
    """x @ [W_0; W_1; ...]^T as Concat(x @ W_0^T, x @ W_1^T, ...) along the last axis, each W_i as its GGUF type.

        x ─┬─ MatMulNBits(W_0, 4-bit) ─┐
           └─ MatMulNBits(W_1, 8-bit) ─┴─ Concat(axis=-1) ─ y
    """
    from onnx import helper

    nodes, outputs = [], []
    for i, part in enumerate(t.block):
        name = f"{t.node.name}/part{i}"
        sub = helper.make_node(
            t.node.op_type, [t.node.input[0], f"{t.weight}.part{i}"], [name + "/output_0"], name=name
        )
        nodes += replacement_nodes(model, t.kind, sub, f"{t.weight}.part{i}", part, accuracy_level, shared, dtype)
        outputs.append(name + "/output_0")
    nodes.append(helper.make_node("Concat", outputs, [t.node.output[0]], name=t.node.name + "/Concat", axis=-1))
    return nodes


def _base(root: Path, manifest) -> tuple[str, str]:
    """(name, dtype) of the variant to quantize from: fp32, else fp16; its dtype says its float type."""
    name = base_variant(manifest)
    if name is None:
        raise QuantizeError(f"{root} has no fp32 or fp16 variant to quantize from; re-export it "
                            "(onnxllm export SOURCE -o OUT, with --dtype float16 for CUDA)")
    dtype = manifest.variants[name].dtype
    if dtype not in _FLOAT_TYPES:
        raise QuantizeError(f"the {name} variant of {root} has dtype {dtype!r}; quantize reads float32 or float16")
    return name, dtype


def _size_target(scheme: Scheme, dtype: str) -> float:
    """The scheme's size target as a share of a `dtype` base: its targets are shares of an fp32 model,
    and an fp16 model is half of that (every weight and table at 2 bytes, not 4)."""
    return round(scheme.max_size_ratio * 4 / np.dtype(_FLOAT_TYPES[dtype][1]).itemsize, 4)


def _meets(scheme: Scheme, report: QualityReport, ratio: float, max_size_ratio: float | None = None) -> bool:
    limit = scheme.max_size_ratio if max_size_ratio is None else max_size_ratio
    return ratio <= limit and report.perplexity_change <= scheme.max_ppl_increase \
        and report.top1_agreement >= scheme.min_top1 and report.kl_divergence <= scheme.max_kl


def quantize(package_dir: str | os.PathLike, scheme: str, options: QuantizeOptions = QuantizeOptions(), *,
             progress: Progress | None = None) -> QuantizeResult:
    """Add the `scheme` variant (a name in SCHEMES) to a package and record how it was made.

    The base is the fp32 variant, else the fp16 one: the new variant has the base's dtype (float16
    activations, KV cache and scales for an fp16 base) and is measured against it. With
    `options.evaluate` (the fidelity corpus along every route generation feeds tokens, quality.score_file),
    it becomes the default when it meets the scheme's targets (for cpu from fp32;
    for cuda and dml from fp16, a float16 graph being slow on CPU), and a warning says when it is far
    from the base.
    """

    started = time.perf_counter()
    say = progress or (lambda _msg: None)
    if scheme not in SCHEMES:
        raise QuantizeError(f"unknown scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}")
    spec, opts = SCHEMES[scheme], options.validate()
    if spec.accuracy_level is not None:  # the scheme is defined by it (int4-exact)
        opts = dataclasses.replace(opts, accuracy_level=spec.accuracy_level)
    head_bits = spec.lm_head_bits if opts.lm_head_bits is None else opts.lm_head_bits
    emb_bits = spec.embed_bits if opts.embed_bits is None else opts.embed_bits
    root = Path(package_dir)
    manifest = read_manifest(root)
    base, dtype = _base(root, manifest)
    if spec.cpu_only and dtype != "float32":
        raise QuantizeError(f"{scheme} is a CPU scheme and needs the fp32 variant (this package's base is "
                            f"{base}); export with --dtype float32")
    elem_type, np_dtype = _FLOAT_TYPES[dtype]
    final = safe_path(root, spec.file)
    if not opts.force and (scheme in manifest.variants or final.exists()):
        raise QuantizeError(f"{root} already has the {scheme} variant ({spec.file}); pass --force (force=True) "
                            "to rebuild it")
    base_path = safe_path(root, manifest.variants[base].file)
    for path in (final, root / MANIFEST):  # before loading and converting the base, not at save
        check_can_create(path, fix="copy the package to a folder you can write to")
    exclude = tuple(opts.exclude)
    notes: list[str] = []

    blocks, gguf_record = None, None
    native = spec.native_gguf  # every weight as the GGUF holds it, at its own precision
    if native and not opts.from_gguf:
        raise QuantizeError("the gguf scheme imports the source GGUF's own blocks; drop --no-gguf, or pick int4/int8")
    if opts.from_gguf:
        gguf_path, why = find_source_gguf(root, manifest.source)
        if gguf_path is None and native:
            raise QuantizeError(f"the gguf scheme imports the source GGUF's own blocks, but {why}; "
                                "use --scheme int4 or int8 instead")
        if gguf_path is None and opts.from_gguf is True:
            raise QuantizeError(f"cannot import GGUF blocks: {why}")
        if gguf_path is not None:
            blocks = GGUFBlocks(gguf_path)
        else:
            gguf_record = {"used": False, "reason": why}

    say(f"loading {base_path.name}")
    model = load_onnx(base_path)
    dynamic = None
    if spec.prepare is not None:
        dynamic = spec.prepare(model, Prepare(root, manifest, lambda name: _matches(exclude, name), say))
    targets, excluded = _find_targets(model, spec, exclude, head_bits, emb_bits, opts.block_size, elem_type)
    if not targets:
        raise QuantizeError("nothing to quantize: every weight is excluded or not a MatMul/Gemm/Gather weight")
    if blocks is not None:
        say(f"importing GGUF blocks from {blocks.path.name}")
        gguf_record = {"used": True, **_import_gguf(targets, blocks, opts.block_size, np_dtype, base, native)}
        why_not = gguf_record.pop("reasons_by_node")
        if native:  # float tensors of the GGUF stay float; anything else that did not import is an error
            kept = [t for t in targets if t.block is None and "a float weight" in why_not.get(t.node.name, "")]
            excluded += [t.node.name for t in kept]
            targets = [t for t in targets if t not in kept]
            gguf_record["kept_float"] = len(kept)
            missing = [t for t in targets if t.block is None]
            if missing:
                raise QuantizeError(f"cannot import {missing[0].node.name} from {blocks.path.name}: "
                                    f"{why_not[missing[0].node.name]}")
            if not targets:
                raise QuantizeError(f"{blocks.path.name} holds only float weights: nothing to import")
        if opts.from_gguf is True and gguf_record["requantized"]:
            reason, where = next(iter(gguf_record["requantized_because"].items()))
            raise QuantizeError(f"cannot import every weight from the GGUF exactly: {where['first']}: {reason}")
    lossless = blocks is not None and all(t.block is not None for t in targets)

    say(f"quantizing {len(targets)} weights to {scheme}")
    model = _build(model, targets, block_size=opts.block_size, symmetric=opts.symmetric,
                   accuracy_level=opts.accuracy_level, dtype=np_dtype, head_level=_head_level(spec, head_bits))
    final.parent.mkdir(parents=True, exist_ok=True)
    commit = Commit(root, keep=QUALITY_FILE)
    # The temp folder lives beside the final file (same filesystem: the renames are atomic).
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        staged = stage / final.name
        _save(model, staged)
        del model
        nbytes = onnx_bytes(staged)
        ratio = nbytes / manifest.variants[base].bytes
        report, meets = None, None
        if not opts.evaluate:  # at least prove ONNX Runtime accepts it before it joins the package
            say("checking that ONNX Runtime loads it")
            DecoderRunner(staged, manifest)
        else:
            # decode and draft passes on a sample where no operator shares a scale across a pass's tokens
            sample = ROUTE_SAMPLE if routes_round_alike(staged) else None
            routes = "decode and drafts on a sample" if sample else "decode, drafts"
            say(f"evaluating against {base} on {opts.eval_tokens} tokens of the fidelity corpus (prefill, {routes})")
            report = score_file(root, staged, variant_name=scheme, reference=base, max_tokens=opts.eval_tokens,
                                route_tokens=sample)
            meets = _meets(spec, report, ratio, _size_target(spec, dtype))
            if report.top1_agreement < WARN_TOP1:
                notes.append(f"WARNING: the {scheme} variant is far from {base}: top-1 agreement "
                             f"{report.top1_agreement:.1%} (< {WARN_TOP1:.0%}), perplexity "
                             f"{report.perplexity_change:+.1%}; consider int8, or exclude layers")
            elif not meets:
                notes.append(f"the {scheme} variant misses its targets (top-1 {report.top1_agreement:.1%}, "
                             f"KL {report.kl_divergence:.4f}, perplexity {report.perplexity_change:+.1%}, "
                             f"size {ratio:.1%}); "
                             "it was not made the default")
        method = _method(spec, opts, targets, dtype=dtype, base=base, head_bits=head_bits, emb_bits=emb_bits,
                         excluded=excluded, lossless=lossless, gguf=gguf_record, dynamic=dynamic, report=report,
                         ratio=ratio, meets=meets)
        data = staged.with_name(staged.name + ".data")
        if data.exists():
            commit.move(data, final.with_name(data.name))
        commit.move(staged, final)
        if report is not None:
            save_quality(root, report)
        method = dataclasses.replace(method, seconds=round(time.perf_counter() - started, 1))
        default_for = _DEFAULT_DEVICES[dtype] if meets else ()
        variant = Variant(file=spec.file, scheme=scheme, dtype=dtype, bytes=nbytes, method=method)
        updated = manifest.with_variant(scheme, variant, default_for=default_for)
        # A rebuilt variant that is no longer known to meet its targets stops being anyone's default.
        demoted = tuple(dev for dev, name in updated.default_variant.items() if name == scheme and not meets)
        if demoted:
            updated = updated.with_variant(base, manifest.variants[base], default_for=demoted)
            notes.append(f"{', '.join(demoted)} default{'s' if len(demoted) > 1 else ''} back to {base}")
        write_manifest(root, updated)
    except BaseException:
        commit.rollback()
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    commit.finish()
    for note in notes:
        say(note)
        warnings.warn(note, stacklevel=2)
    say(f"{scheme}: {nbytes / 2**20:.1f} MiB ({ratio:.1%} of {base})"
        + (f" - default for {', '.join(default_for)}" if default_for else ""))
    return QuantizeResult(scheme, final, nbytes, ratio, method, report, meets, default_for, notes,
                          round(time.perf_counter() - started, 1), base)


def _method(spec: Scheme, opts: QuantizeOptions, targets: list[_Target], *, dtype: str, base: str, head_bits: int,
            emb_bits: int, excluded: list[str], lossless: bool, gguf: dict | None, dynamic: dict | None,
            report: QualityReport | None, ratio: float, meets: bool | None) -> QuantizeMethod:
    """The manifest's record of how the variant was made."""
    import onnxruntime

    kinds = {t.kind for t in targets}
    plain = "fp32" if dtype == "float32" else "fp16"
    # 8-bit weights beside layers in another form (int4, or int8-dynamic's DynamicQuantizeMatMul).
    mixed = spec.bits != 8 or spec.layer_operator != "MatMulNBits"
    return QuantizeMethod(
        quantizer="onnxruntime.quantization MatMulNBitsQuantizer (DefaultWeightOnlyQuantConfig)",
        operator=f"{MS_DOMAIN}.{spec.layer_operator}", block_size=opts.block_size,
        # the gguf scheme's weights have each their GGUF type's width: the widest is recorded
        bits=max(t.bits for t in targets) if spec.native_gguf else spec.bits,
        symmetric=opts.symmetric, accuracy_level=opts.accuracy_level, base=base, dtype=dtype, scales_dtype=dtype,
        lm_head=LmHeadMethod(head_bits if "lm_head" in kinds else 0,
                             "MatMulNBits" if "lm_head" in kinds else f"Gemm ({plain})",
                             _head_level(spec, head_bits) if "lm_head" in kinds else None),
        embedding=EmbeddingMethod(emb_bits if "embedding" in kinds else 0,
                                  "GatherBlockQuantized" if "embedding" in kinds else f"Gather ({plain})",
                                  _tied(targets) and head_bits == emb_bits),
        exclude=tuple(opts.exclude), excluded=tuple(excluded),
        kept_8bit=tuple(t.node.name for t in targets if t.bits == 8 and mixed),
        lossless=lossless, gguf=gguf, dynamic=dynamic, quality=report.to_dict() if report else None,
        targets=QualityTargets(_size_target(spec, dtype), spec.max_ppl_increase, spec.min_top1, spec.max_kl),
        # Exact weights: what still moves top-1 is accuracy_level 4 (activations rounded to int8).
        lossless_check=None if not (lossless and report) else LosslessCheck(
            LOSSLESS_MIN_TOP1, report.top1_agreement >= LOSSLESS_MIN_TOP1),
        size_ratio=round(ratio, 4), meets_targets=meets, onnxruntime=onnxruntime.__version__)


def _head_level(spec: Scheme, head_bits: int) -> int | None:
    """The lm_head's own accuracy level: the scheme's, for a quantized head."""
    return spec.lm_head_accuracy_level if head_bits else None


def _tied(targets: list[_Target]) -> bool:
    heads = {t.weight for t in targets if t.kind == "lm_head"}
    return any(t.kind == "embedding" and t.weight in heads for t in targets)
