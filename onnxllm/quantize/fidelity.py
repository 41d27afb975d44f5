"""How close a variant is to its base model on a mixed corpus, through the passes generation makes.

The corpus (quantize/corpus/, about 4,800 SmolLM2 tokens) holds five kinds of text: prose, verse and
dialogue (Shakespeare), Python code, and chat transcripts rendered with the package's chat template.
One reading of the same text can take three routes through a decoder, and quantized kernels round
each differently (an int8 activation scale covers the tokens of one pass), so each is scored:

    prefill  the passage fed as a prompt is: up to 256 tokens per pass (SessionConfig.prefill_chunk)
    decode   one token per pass through the KV cache, as an answer is written without drafts
    draft    passes of DRAFT_WIDTH tokens with every position's logits, as prompt-lookup checks run

Both models run through the runtime's own DecoderSession (IO binding, shared KV cache), so what is
measured is what `onnxllm run` computes. The reference's logits come from its prefill route (fp32
rounds the routes alike to ~1e-6). Greedy agreement: each of several short prompts is answered by
both models with the generation loop (drafts on, as by default), and the tokens before the first
difference are counted.

The quantizer's gate may take the decode and draft routes on a sample (`route_tokens`): where no
operator of the variant shares a quantization scale across the tokens of a pass (MatMulNBits quantizes
each row of its input on its own, at every accuracy level), the three routes compute the same numbers
(measured on SmolLM2 int4-exact: equal figures to four digits) and one-token passes are what costs
(2/3 of the gate's time). The sample is checked against the prefill route on the same tokens; when
they differ by more than ROUTE_TOLERANCE the routes are scored on the whole corpus after all.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import QuantizeError
from ..package import Manifest

CORPUS_DIR = Path(__file__).parent / "corpus"
KINDS = ("prose", "verse", "dialogue", "code", "chat")
PATHS = ("prefill", "decode", "draft")
DRAFT_WIDTH = 5  # the last token + 4 guesses: the first draft length generate_tokens tries
CORPUS_TOKENS = 4096  # tokens scored by default, shared evenly among the passages
GREEDY_TOKENS = 32  # per prompt
_ROWS = 128  # log-softmax rows computed at once (a (128, 49152) float64 block is 48 MiB)
ROUTE_SAMPLE = 512  # decode/draft tokens the gate scores when the routes round alike (see above)
ROUTE_TOLERANCE = (0.005, 0.001)  # top-1 points, KL nats: a sampled route this close to prefill's is alike
# Operators whose activation scale covers every token of a pass: with them the routes round differently.
PASS_SCALED_OPS = frozenset({"DynamicQuantizeMatMul", "DynamicQuantizeLinear", "MatMulInteger", "QAttention",
                             "DynamicQuantizeLSTM", "QLinearMatMul", "QuantizeLinear"})


@dataclass(frozen=True)
class Passage:
    kind: str
    text: str = ""
    messages: tuple[dict, ...] = ()  # a chat transcript, rendered with the chat template when there is one


def _read(name: str) -> str:
    path = CORPUS_DIR / name
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise QuantizeError(
            f"the fidelity corpus file {path} cannot be read ({exc.strerror}); reinstall onnxllm"
        ) from None


def parse_transcripts(text: str) -> list[tuple[dict, ...]]:
    """Conversations separated by a line `---`; a turn starts with `system:`, `user:` or `assistant:`,
    and the lines after it, up to the next turn, belong to it."""
    conversations = []
    for block in text.split("\n---\n"):
        turns: list[dict] = []
        for line in block.strip("\n").splitlines():
            role, sep, rest = line.partition(": ")
            if sep and role in ("system", "user", "assistant"):
                turns.append({"role": role, "content": rest})
            elif turns:
                turns[-1]["content"] += "\n" + line
            elif line.strip():
                raise QuantizeError(f"chat transcript line {line[:40]!r} comes before any 'user:' turn")
        if turns:
            conversations.append(tuple(turns))
    return conversations


def corpus() -> list[Passage]:
    """The built-in passages, one or more per kind (corpus/SOURCES.md says where each comes from)."""
    passages = [Passage(kind, _read(f"{kind}.txt")) for kind in KINDS if kind != "chat"]
    passages += [Passage("chat", messages=m) for m in parse_transcripts(_read("chat.txt"))]
    return passages


def greedy_prompts() -> list[str]:
    return [line.strip() for line in _read("prompts.txt").splitlines() if line.strip()]


@dataclass(frozen=True)
class PathFigures:
    """One route's agreement with the reference over every scored position."""

    path: str
    tokens: int
    top1_agreement: float
    kl_divergence: float  # mean KL(reference || variant), nats
    perplexity: float
    by_kind: dict  # kind -> {"tokens", "top1_agreement", "kl_divergence"}

    def to_dict(self) -> dict:
        return asdict(self)


class _Stats:
    """Running sums of agreement, KL and negative log-likelihood, in total and per kind."""

    def __init__(self):
        self.n = self.top1 = self.kl = self.nll = self.nll_n = 0.0
        self.kinds: dict[str, list[float]] = {}

    def add(self, kind: str, variant: np.ndarray, reference: np.ndarray, ids: list[int]) -> None:
        """variant/reference: (T, vocab) logits of the T positions of `ids`."""
        top1 = kl = 0.0
        for s in range(0, len(ids), _ROWS):
            lv, lr = _log_softmax(variant[s:s + _ROWS]), _log_softmax(reference[s:s + _ROWS])
            top1 += float((lv.argmax(-1) == lr.argmax(-1)).sum())
            kl += float(np.maximum((np.exp(lr) * (lr - lv)).sum(-1), 0.0).sum())
            targets = np.asarray(ids[s + 1:s + 1 + len(lv)])  # the next token of each row, where there is one
            self.nll -= float(lv[np.arange(len(targets)), targets].sum())
            self.nll_n += len(targets)
        self.n += len(ids)
        self.top1 += top1
        self.kl += kl
        k = self.kinds.setdefault(kind, [0.0, 0.0, 0.0])
        k[0], k[1], k[2] = k[0] + len(ids), k[1] + top1, k[2] + kl

    def figures(self, path: str) -> PathFigures:
        by_kind = {kind: {"tokens": int(n), "top1_agreement": round(t / n, 5), "kl_divergence": round(kl / n, 6)}
                   for kind, (n, t, kl) in self.kinds.items()}
        return PathFigures(path, int(self.n), round(self.top1 / self.n, 5), round(self.kl / self.n, 6),
                           round(math.exp(self.nll / max(self.nll_n, 1)), 4), by_kind)

    def perplexity(self) -> float:
        return math.exp(self.nll / max(self.nll_n, 1))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def route_logits(session, ids: list[int], path: str) -> np.ndarray:
    """(len(ids), vocab) logits of every position, fed from an empty cache the way `path` feeds it."""
    session.rewind(0)
    session.reserve(len(ids))
    if path == "prefill":
        return np.array(session.forward(ids, all_logits=True), np.float32)
    if path == "decode":
        return np.stack([np.array(session.forward([t]), np.float32) for t in ids])
    if path == "draft":
        return np.concatenate([np.array(session.forward(ids[i:i + DRAFT_WIDTH], all_logits=True), np.float32)
                               for i in range(0, len(ids), DRAFT_WIDTH)])
    raise QuantizeError(f"unknown path {path!r}; valid: {', '.join(PATHS)}")


def _greedy(session, prompt: list[int], new_tokens: int, eos_ids: Sequence[int]) -> list[int]:
    from ..runtime.generate import GenerationConfig, generate_tokens

    session.rewind(0)
    events = generate_tokens(session, prompt, GenerationConfig(max_tokens=new_tokens), eos_ids=eos_ids)
    return [e.token for e in events if e.token is not None]


def _encode(model, passage: Passage) -> list[int]:
    if not passage.messages:
        return model.encode(passage.text)
    if model.template is not None:
        text = model.render(list(passage.messages), add_generation_prompt=False)
        return model.tokenizer.encode(text, add_special_tokens=False).ids
    return model.encode("\n".join(f"{m['role']}: {m['content']}" for m in passage.messages))


def _shares(lengths: list[int], budget: int) -> list[int]:
    """Tokens to take from each passage: `budget` split evenly, what a short passage cannot use going to
    the longer ones (so the whole corpus is scored when the budget covers it)."""
    shares = [0] * len(lengths)
    left = budget
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for k, i in enumerate(order):
        shares[i] = min(lengths[i], math.ceil(left / (len(order) - k)))
        left -= shares[i]
    return shares


def routes_round_alike(onnx_path: str | os.PathLike) -> bool:
    """True when no operator of the graph shares an activation scale across a pass's tokens (PASS_SCALED_OPS),
    so prefill, decode and draft passes compute the same numbers and the gate may sample the slow routes."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    ops = {n.op_type for n in model.graph.node} | {n.op_type for f in model.functions for n in f.node}
    return not ops & PASS_SCALED_OPS


def _alike(route: PathFigures, prefill: PathFigures) -> bool:
    top1, kl = ROUTE_TOLERANCE
    return abs(route.top1_agreement - prefill.top1_agreement) <= top1 and \
        abs(route.kl_divergence - prefill.kl_divergence) <= kl


@dataclass(frozen=True)
class Measured:
    """What `measure` found: per-route figures, the reference's perplexity, greedy agreement."""

    paths: tuple[PathFigures, ...]
    reference_perplexity: float
    greedy_agreement: int  # tokens equal to the reference's before the first difference, summed over prompts
    greedy_tokens: int  # the reference's answer lengths, summed
    greedy_prompts: int
    sampled: tuple[str, ...] = ()  # routes scored on a sample (route_tokens) and found alike to prefill's

    def headline(self) -> tuple[PathFigures, ...]:
        """The routes the headline figures come from: those scored on the whole text (a sampled route,
        checked alike to prefill on its tokens, would add only its sample's noise)."""
        return tuple(p for p in self.paths if p.path not in self.sampled) or self.paths


def measure(variant_session, reference_model, passages: Sequence[Passage], *, tokens: int = CORPUS_TOKENS,
            paths: Sequence[str] = PATHS, prompts: Sequence[str | list[int]] = (), greedy_tokens: int = GREEDY_TOKENS,
            greedy_session=None, route_tokens: int | None = None) -> Measured:
    """Score `variant_session` against `reference_model` (a loaded Model: its tokenizer, chat template and
    session) on `passages`, `tokens` tokens in all shared evenly among them, each cut into windows that fit
    the context. `prompts` (text, chat-rendered when the model has a template, or token ids) are answered
    greedily by both for the greedy agreement. `greedy_session`: the variant's session for that
    (default `variant_session`). `route_tokens`: score the routes other than prefill on that many tokens
    only, shared among the passages likewise, and on all of them if the sample is not alike to prefill's."""
    ref = reference_model.session
    context = min(ref.context, variant_session.context)
    window = min(context, 1024)
    encoded = [(p.kind, _encode(reference_model, p)) for p in passages]
    shares = _shares([len(ids) for _, ids in encoded], tokens)
    sample = _shares(shares, route_tokens) if route_tokens and "prefill" in paths else shares
    sampling = sample != shares
    stats = {p: _Stats() for p in paths}
    alike = _Stats()  # the prefill route on the sampled tokens, to check the sampled routes against
    reference = _Stats()
    scored = 0
    for (kind, ids), share, sampled in zip(encoded, shares, sample):
        for start in range(0, share, window):
            win = ids[start:min(share, start + window)]
            if len(win) < 2:
                continue
            ref_logits = route_logits(ref, win, "prefill")
            reference.add(kind, ref_logits, ref_logits, win)
            part = win[:max(0, sampled - start)]  # this window's tokens inside the passage's sample
            for p in paths:
                if p == "prefill" or len(part) == len(win):
                    logits = route_logits(variant_session, win, p)
                    stats[p].add(kind, logits, ref_logits, win)
                    if p == "prefill" and sampling and len(part) >= 2:
                        alike.add(kind, logits[:len(part)], ref_logits[:len(part)], part)
                elif len(part) >= 2:
                    stats[p].add(kind, route_logits(variant_session, part, p), ref_logits[:len(part)], part)
            scored += len(win)
    if not scored:
        raise QuantizeError("the evaluation text is too short: it needs at least 2 tokens")
    sampled_paths = tuple(p for p in paths if p != "prefill" and stats[p].n < stats["prefill"].n) \
        if "prefill" in paths else ()
    if sampled_paths and not all(_alike(stats[p].figures(p), alike.figures("prefill")) for p in sampled_paths):
        # the routes round differently after all: score them on the whole text
        return measure(variant_session, reference_model, passages, tokens=tokens, paths=paths, prompts=prompts,
                       greedy_tokens=greedy_tokens, greedy_session=greedy_session)
    agree = total = 0
    eos = reference_model.manifest.eos_token_ids
    for prompt in prompts:
        ids = (reference_model.prompt_ids(prompt, chat=reference_model.template is not None)
               if isinstance(prompt, str) else list(prompt))
        want = _greedy(ref, ids, greedy_tokens, eos)
        got = _greedy(greedy_session or variant_session, ids, greedy_tokens, eos)
        total += len(want)
        for a, b in zip(got, want):
            if a != b:
                break
            agree += 1
    return Measured(tuple(stats[p].figures(p) for p in paths), round(reference.perplexity(), 4), agree, total,
                    len(prompts), sampled_paths)


def open_variant(onnx_path: str | os.PathLike, manifest: Manifest, *, threads: int | None = None):
    """A CPU DecoderSession over any .onnx of the package (a staged variant not yet in the manifest too)."""
    from ..runtime.providers import session_options
    from ..runtime.session import open_session

    return open_session(Path(onnx_path), manifest, providers=["CPUExecutionProvider"],
                        options=session_options(threads=threads))


def load_reference(package_dir: str | os.PathLike, reference: str, *, threads: int | None = None):
    from ..runtime.model import LoadOptions, load_package

    return load_package(package_dir, LoadOptions(device="cpu", variant=reference, threads=threads))
