"""Runtime: the generation loop (fake session with scripted logits) and real ONNX Runtime sessions."""

from __future__ import annotations

from dataclasses import replace
import subprocess
import sys
import threading

import numpy as np
import pytest

import onnxllm
from onnxllm.errors import ContextOverflowError, GenerationError, InvalidPackageError
from onnxllm.runtime.generate import GenerationConfig, generate_tokens, stream_text
from onnxllm.runtime.model import LoadOptions, load_package
from onnxllm.runtime.session import SessionConfig, open_session

from _helpers import FakeSession, with_template


def _tokens(events):
    return [e.token for e in events if e.token is not None]


def test_greedy_follows_script_and_respects_max_tokens():
    s = FakeSession()
    events = list(generate_tokens(s, [1, 2], GenerationConfig(max_tokens=5)))
    assert _tokens(events) == [3, 4, 5, 6, 7]
    assert events[-1].finish_reason == "length"
    assert s.fed == [[1, 2], [3], [4], [5], [6]]  # prefill once, then one token per step


def test_eos_stops_and_is_not_returned():
    events = list(generate_tokens(FakeSession(), [1], GenerationConfig(max_tokens=10), eos_ids=[4]))
    assert _tokens(events) == [2, 3]
    assert events[-1].finish_reason == "eos"


def test_seed_reproducible_and_temperature_zero_deterministic():
    cfg = GenerationConfig(max_tokens=12, temperature=1.5, seed=7)
    a = _tokens(generate_tokens(FakeSession(), [1], cfg))
    b = _tokens(generate_tokens(FakeSession(), [1], cfg))
    c = _tokens(generate_tokens(FakeSession(), [1], GenerationConfig(max_tokens=12, temperature=1.5, seed=8)))
    assert a == b and a != c
    g = GenerationConfig(max_tokens=12)
    assert _tokens(generate_tokens(FakeSession(), [1], g)) == _tokens(generate_tokens(FakeSession(), [1], g))


def test_prefix_reuse_prefills_only_new_tokens():
    s = FakeSession()
    list(generate_tokens(s, [1, 2, 3], GenerationConfig(max_tokens=2)))
    s.fed.clear()
    list(generate_tokens(s, [1, 2, 3, 4, 9, 9], GenerationConfig(max_tokens=1)))
    assert s.fed[0] == [9, 9]  # 1,2,3,4 were in the cache (4 was generated)


def test_cancel_before_and_during():
    cancel = threading.Event()
    cancel.set()
    events = list(generate_tokens(FakeSession(), [1], GenerationConfig(max_tokens=10), cancel=cancel))
    assert events[-1].finish_reason == "cancelled" and not _tokens(events)
    cancel = threading.Event()
    got = []
    for e in generate_tokens(FakeSession(), [1], GenerationConfig(max_tokens=10), cancel=cancel):
        got.append(e)
        cancel.set()
    assert len(_tokens(got)) == 1 and got[-1].finish_reason == "cancelled"


class CharTokenizer:
    """decode() of ids as characters: enough to test stop strings."""

    def __init__(self, alphabet):
        self.alphabet = alphabet

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.alphabet[i] for i in ids)


def test_stop_string_cuts_exactly():
    alphabet = "abcdefghijklmnop"
    events = generate_tokens(FakeSession(), [0], GenerationConfig(max_tokens=10))
    chunks = list(stream_text(events, CharTokenizer(alphabet), GenerationConfig(stop=("def",))))
    assert "".join(c.text for c in chunks) == "bc"
    assert chunks[-1].finish_reason == "stop"
    # a stop string that never completes is flushed as text
    events = generate_tokens(FakeSession(), [0], GenerationConfig(max_tokens=3))
    chunks = list(stream_text(events, CharTokenizer(alphabet), GenerationConfig(stop=("dX",))))
    assert "".join(c.text for c in chunks) == "bcd" and chunks[-1].finish_reason == "length"


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
                                 dict(max_tokens=0), dict(min_p=2), dict(min_p=-0.1), dict(nonsense=1)])
def test_bad_options_are_errors(tiny_llama, bad):
    m = onnxllm.load(tiny_llama)
    with pytest.raises(GenerationError):
        m.generate("hello", **bad)


@pytest.mark.parametrize("prompt", ["", "a\x00b", b"\xff\xfe", "bad \udcff"])
def test_bad_prompts_are_errors(tiny_llama, prompt):
    with pytest.raises(GenerationError):
        onnxllm.load(tiny_llama).generate(prompt)


def test_prompt_longer_than_context(tiny_llama):
    m = onnxllm.load(tiny_llama, context=32)
    with pytest.raises(ContextOverflowError, match="exceeds the context of 32"):
        m.generate("x" * 40, max_tokens=4)
    assert m.generate("hi", max_tokens=4).token_ids  # still usable


def test_cached_decode_equals_full_recompute(tiny_llama):
    m = onnxllm.load(tiny_llama)
    ids = m.encode("the quick brown fox jumps over the lazy dog")
    s = m.session
    s.rewind(0)
    full = s.forward(ids, all_logits=True)
    assert full.shape == (len(ids), m.manifest.architecture.vocab_size)
    s.rewind(0)
    step = [s.forward(ids[:4])]
    step += [s.forward([t]) for t in ids[4:]]
    np.testing.assert_allclose(np.stack(step), full[3:], atol=1e-5)
    # A few tokens after a cached prefix, every position's logits (a speculative check), then one again.
    s.rewind(5)
    np.testing.assert_allclose(s.forward(ids[5:9], all_logits=True), full[5:9], atol=1e-5)
    np.testing.assert_allclose(s.forward(ids[9:10]), full[9], atol=1e-5)


@pytest.mark.parametrize("kv_mode", ["shared", "growing"])
def test_chunked_prefill_equals_one_pass(tiny_llama, kv_mode):
    m = onnxllm.load(tiny_llama, kv_mode=kv_mode)
    ids = m.encode("the quick brown fox jumps over the lazy dog, then the dog sleeps")
    s = m.session
    s.config = replace(s.config, prefill_chunk=0)
    s.rewind(0)
    whole_last = s.forward(ids)
    s.rewind(0)
    whole_all = s.forward(ids, all_logits=True)
    s.config = replace(s.config, prefill_chunk=4)
    s.rewind(0)
    before = s.passes
    np.testing.assert_allclose(s.forward(ids), whole_last, atol=1e-5)
    assert s.passes - before == -(-len(ids) // 4) and s.tokens == ids  # one pass per chunk of 4
    s.rewind(0)
    np.testing.assert_allclose(s.forward(ids, all_logits=True), whole_all, atol=1e-5)
    plain = onnxllm.load(tiny_llama, kv_mode=kv_mode)
    plain.session.config = replace(plain.session.config, prefill_chunk=0)
    assert m.generate("the quick brown fox jumps over the lazy dog", max_tokens=12).token_ids == \
        plain.generate("the quick brown fox jumps over the lazy dog", max_tokens=12).token_ids


@pytest.mark.parametrize("io_binding", [True, False])
def test_prefill_computes_only_the_last_positions_logits(tiny_llama, io_binding):
    # num_logits_to_keep is an input with a default (0: every position), which ORT lists as an overridable
    # initializer; the session binds 1 on every call, so a prompt's prefill computes one row of logits.
    m = onnxllm.load(tiny_llama, io_binding=io_binding)
    ids = m.encode("the quick brown fox jumps over the lazy dog")
    m.session.rewind(0)
    seen = []
    if io_binding:  # ORT's own IOBinding, seen through the ORT session's public method
        run = m.session.session.run_with_iobinding
        m.session.session.run_with_iobinding = lambda b, *a: (run(b, *a), seen.append(b.get_outputs()[0].shape()))[0]
        m.session.forward(ids)
    else:
        run = m.session.session.run
        def counting_run(names, feed):  # records how many positions' logits each call asks for
            seen.append(feed[m.manifest.io.logits_to_keep].item())
            return run(names, feed)

        m.session.session.run = counting_run
        m.session.forward(ids)
    assert seen == ([[1, 1, m.manifest.architecture.vocab_size]] if io_binding else [1])


@pytest.mark.parametrize("kv_mode,io_binding", [("shared", False), ("growing", True), ("growing", False)])
def test_cache_modes_and_io_binding_equal_reference(tiny_llama, kv_mode, io_binding):
    ref = onnxllm.load(tiny_llama).generate("the theory", max_tokens=24)
    other = onnxllm.load(tiny_llama, kv_mode=kv_mode, io_binding=io_binding).generate("the theory", max_tokens=24)
    assert other.token_ids == ref.token_ids


def test_shared_cache_grows_past_initial_capacity(tiny_llama):
    m = load_package(tiny_llama, LoadOptions())
    onnx_path = tiny_llama / m.manifest.variants[m.variant].file
    small = open_session(onnx_path, m.manifest, providers=["CPUExecutionProvider"], options=None,
                         config=SessionConfig(initial_capacity=8))
    assert small.capacity == 8
    ref = onnxllm.load(tiny_llama, kv_mode="growing").generate("the one", max_tokens=40, draft_tokens=0)
    ids = m.encode("the one")
    tokens = [e.token for e in generate_tokens(small, ids, GenerationConfig(max_tokens=40, draft_tokens=0))
              if e.token is not None]
    assert tokens == ref.token_ids
    assert small.capacity >= len(ids) + 40 > 8


def test_stream_equals_generate_and_full_decode(tiny_llama):
    m = onnxllm.load(tiny_llama)
    chunks = list(m.stream("in the", max_tokens=30, temperature=1.0, seed=3))
    result = m.generate("in the", max_tokens=30, temperature=1.0, seed=3)
    assert "".join(c.text for c in chunks) == result.text
    assert [c.token for c in chunks if c.token is not None] == result.token_ids
    assert result.text == m.tokenizer.decode(result.token_ids)
    assert chunks[-1].finish_reason in ("length", "eos") and chunks[-1].timings.generated_tokens >= 1


def test_break_out_of_stream_leaves_model_ready(tiny_llama):
    m = onnxllm.load(tiny_llama)
    for i, _ in enumerate(m.stream("the", max_tokens=50)):
        if i == 3:
            break
    assert m.generate("the", max_tokens=5).token_ids == onnxllm.load(tiny_llama).generate("the", max_tokens=5).token_ids


def test_abandoned_stream_does_not_block_or_corrupt(tiny_llama):
    """`for c in s: break` with `s` still referenced: the next call runs, the old stream is retired."""
    m = onnxllm.load(tiny_llama)
    expected = onnxllm.load(tiny_llama).generate("the", max_tokens=6).token_ids
    old = m.stream("in the house", max_tokens=50)
    for _ in old:
        break
    assert m.generate("the", max_tokens=6).token_ids == expected  # same thread: no deadlock
    rest = list(old)  # resuming the old stream does not touch the session again
    assert rest[-1].finish_reason == "cancelled"
    assert m.generate("the", max_tokens=6).token_ids == expected
    nested = []
    for chunk in m.stream("the", max_tokens=3):
        nested.append(m.generate("the", max_tokens=6).token_ids)  # a call inside a stream's loop
        break
    assert nested == [expected]


def test_cancel_from_another_thread(tiny_llama):
    """A worker thread streams; the main thread sets `cancel` while that stream is still open: it ends at once."""
    m = onnxllm.load(tiny_llama)
    cancel, third, resume = threading.Event(), threading.Event(), threading.Event()
    seen, errors = [], []

    def worker():
        try:
            for chunk in m.stream("the", max_tokens=200, cancel=cancel):
                seen.append(chunk)
                if len(seen) == 3:
                    third.set()
                    assert resume.wait(30)  # the stream stays open until the main thread has cancelled
        except BaseException as exc:  # noqa: BLE001 - reported below, on the main thread
            errors.append(exc)

    t = threading.Thread(target=worker)
    t.start()
    assert third.wait(30)
    assert t.is_alive() and not seen[-1].finish_reason  # mid-stream, on the other thread
    cancel.set()
    resume.set()
    t.join(30)
    assert not t.is_alive() and not errors
    assert seen[-1].finish_reason == "cancelled"
    assert len([c for c in seen if c.token is not None]) == 3  # stopped within one token
    assert m.generate("the", max_tokens=3).finish_reason in ("length", "eos")


def test_two_threads_one_model_serialized(tiny_llama):
    m = onnxllm.load(tiny_llama)
    prompts = ["the man", "in an hour", "out of the house", "thin"]
    expected = [m.generate(p, max_tokens=16).token_ids for p in prompts]
    results = {}

    def work(i):
        results[i] = m.generate(prompts[i], max_tokens=16).token_ids

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(prompts))] == expected


def test_two_models_side_by_side(tiny_llama, tiny_gpt2):
    """Two models in one process, their streams interleaved token by token, answer as each does alone."""
    alone = [onnxllm.load(p).generate("the", max_tokens=12).token_ids for p in (tiny_llama, tiny_gpt2)]
    assert alone[0] != alone[1]  # different models: mixing them up would show
    a, b = onnxllm.load(tiny_llama), onnxllm.load(tiny_gpt2)
    streams, got = [a.stream("the", max_tokens=12), b.stream("the", max_tokens=12)], [[], []]
    for pair in zip(*streams):  # one chunk of a, one of b, ...
        for i, chunk in enumerate(pair):
            if chunk.token is not None:
                got[i].append(chunk.token)
    for i, rest in enumerate(streams):
        got[i] += [c.token for c in rest if c.token is not None]
    assert got == alone
    assert [a.generate("the", max_tokens=12).token_ids, b.generate("the", max_tokens=12).token_ids] == alone


def test_chat_second_turn_prefills_only_new_tokens(tiny_llama, tmp_path):
    pkg = with_template(tiny_llama, tmp_path)
    m = onnxllm.load(pkg)
    chat = m.chat(system="be brief")
    first = chat.ask("hello there", max_tokens=8)
    second = chat.ask("and then?", max_tokens=8)
    assert second.timings.cached_tokens > 0
    assert second.timings.prompt_tokens - second.timings.cached_tokens < second.timings.prompt_tokens // 2
    # a fresh model over the whole conversation gives the same reply
    fresh = onnxllm.load(pkg)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"},
                {"role": "assistant", "content": first.text}, {"role": "user", "content": "and then?"}]
    assert fresh.generate(messages, max_tokens=8).token_ids == second.token_ids
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "be brief"}]


def test_chat_context_overflow_error_or_truncate(tiny_llama, tmp_path):
    pkg = with_template(tiny_llama, tmp_path)
    m = onnxllm.load(pkg)  # 256 tokens; one exchange of 40 characters takes ~100 byte-level tokens
    chat = m.chat()
    for _ in range(2):
        chat.ask("x" * 40, max_tokens=4)
    with pytest.raises(ContextOverflowError, match="truncate"):
        chat.ask("y" * 40, max_tokens=4)
    assert chat.messages[-1]["role"] == "assistant"  # the refused turn was not kept
    result = chat.ask("y" * 40, max_tokens=4, context_overflow="truncate")
    assert result.token_ids and len(chat.messages) < 6


def test_gpt2_five_line_example(tiny_gpt2):
    """The README's five lines: 50 greedy tokens of a GPT-2 package, each the argmax after the ones before."""
    model = onnxllm.load(tiny_gpt2)
    result = model.generate("The quick brown fox", max_tokens=50)
    print(result.text)
    assert result.finish_reason == "length" and len(result.token_ids) == 50  # the tiny model has no EOS habit
    assert result.text == model.tokenizer.decode(result.token_ids)
    prompt = model.encode("The quick brown fox")
    model.session.rewind(0)
    logits = model.session.forward(prompt + result.token_ids[:-1], all_logits=True)  # one pass, no cache reuse
    assert logits[len(prompt) - 1:].argmax(-1).tolist() == result.token_ids


def test_runtime_imports_no_torch(tiny_llama):
    code = ("import sys, onnxllm; m = onnxllm.load(sys.argv[1]); m.generate('the', max_tokens=4); "
            "bad = [k for k in sys.modules if k.split('.')[0] in ('torch', 'transformers', 'onnx')]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_llama)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_variant_not_in_package(tiny_llama):
    with pytest.raises(InvalidPackageError, match="variant 'int4' is not in this package"):
        onnxllm.load(tiny_llama, variant="int4")


@pytest.mark.real
def test_smollm2_chat_template_and_chat(smollm2_package, reference):
    m = onnxllm.load(smollm2_package)
    r = reference["chat_template_render"]
    assert m.render(r["messages"], add_generation_prompt=r["add_generation_prompt"]) == r["text"]
    chat = m.chat(system="You are a helpful assistant.")
    answer = chat.ask("What is the capital of France?", max_tokens=30)
    assert "Paris" in answer.text
    follow = chat.ask("And of Germany?", max_tokens=30)
    assert follow.timings.cached_tokens >= answer.timings.prompt_tokens


def test_float32_variant_never_sent_to_cuda(tiny_llama, monkeypatch):
    """CUDA's GroupQueryAttention is float16-only: auto falls back to CPU with a reason; explicit cuda errs."""
    from onnxllm.errors import DeviceError
    from onnxllm.runtime import model as model_mod
    from onnxllm.runtime.providers import ProviderChoice

    cuda = ProviderChoice("cuda", [("CUDAExecutionProvider", {}), ("CPUExecutionProvider", {})])
    monkeypatch.setattr(model_mod, "select_providers", lambda device: cuda)
    m = model_mod.load_package(tiny_llama, LoadOptions(device="auto"))
    assert m.placement.device == "cpu" and "float16" in m.placement.fallback_reason
    assert m.execution_providers == ["CPUExecutionProvider"]
    with pytest.raises(DeviceError, match="float16"):
        model_mod.load_package(tiny_llama, LoadOptions(device="cuda"))


def test_a_generation_config_and_overrides(tiny_llama):
    """A GenerationConfig replaces the package's defaults; keyword overrides change single fields of it."""
    m = onnxllm.load(tiny_llama)
    config = GenerationConfig(max_tokens=6, temperature=1.0, seed=4)
    by_config = m.generate("the", config)
    assert len(by_config.token_ids) == 6 or by_config.finish_reason == "eos"
    assert by_config.token_ids == m.generate("the", max_tokens=6, temperature=1.0, seed=4).token_ids
    assert m.generate("the", config, max_tokens=3).token_ids == by_config.token_ids[:3]
    assert onnxllm.generate(m, "the", config).token_ids == by_config.token_ids
    with pytest.raises(GenerationError, match="unknown generation option"):
        m.generate("the", config, nonsense=1)
