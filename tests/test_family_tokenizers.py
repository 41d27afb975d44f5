"""The families' tokenizers and chat templates through an exported package equal transformers'.

Two tokenizer kinds, built here with the `tokenizers` library: byte-level BPE with a Qwen/Llama-3 style
pre-tokenizer split (Qwen2/3, Llama 3, SmolLM) and SentencePiece-style BPE with byte fallback (Gemma, Phi-3,
Llama 2). Templates written here mirror the shipped ones' features: Qwen3's tools, tool calls, tool
responses, reasoning and `enable_thinking`; Llama 3.1's tools and `date_string` default; Gemma 3's missing
system role (folded into the first user turn) and alternation check; Phi-3's role tags and trailing EOS.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _templates import GEMMA3, LLAMA31, PHI3, QWEN3
from _tiny import make_tiny_checkpoint

pytest.importorskip("transformers")

import onnxllm  # noqa: E402
from onnxllm import ChatVariables  # noqa: E402

TEXT = ("def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 🙂👍🏽\n"
        "中文分词测试，日本語も。 Prices: 1234567.89 €, 42%\t<|im_start|>user\nhi<|im_end|> <start_of_turn>model\n")


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city"]}}}]
SYSTEM = {"role": "system", "content": "You are terse. 用中文回答。"}
CONVERSATIONS = {
    "system_user": [SYSTEM, {"role": "user", "content": "What is 2+2? 🙂"}],
    "multi_turn": [{"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "<think>\nGreet.\n</think>\n\nHello!"},
                   {"role": "user", "content": "def f(): pass — explain"}],
    "tool_call": [SYSTEM, {"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": "", "tool_calls": [
                      {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                  {"role": "tool", "content": "{\"temp\": 21}"}],
}

# template -> (tokenizer kind, conversations it accepts, variable sets to render with)
TEMPLATES = {
    "qwen3": (QWEN3, "byte_bpe", sorted(CONVERSATIONS),
              [ChatVariables(), ChatVariables(enable_thinking=False), ChatVariables(enable_thinking=True),
               ChatVariables(tools=TOOLS), ChatVariables(tools=TOOLS, enable_thinking=False)]),
    "llama3.1": (LLAMA31, "byte_bpe", sorted(CONVERSATIONS), [ChatVariables(), ChatVariables(tools=TOOLS)]),
    "gemma3": (GEMMA3, "sentencepiece_bpe", ["system_user", "multi_turn"], [ChatVariables()]),
    "phi3": (PHI3, "sentencepiece_bpe", ["system_user", "multi_turn"], [ChatVariables()]),
}

BYTE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eot_id|>"]
SP_SPECIALS = ["<unk>", "<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>", "<|system|>", "<|user|>",
               "<|assistant|>", "<|end|>"]
CORPUS = ["the quick brown fox jumps over the lazy dog", "def return int fib else if", "hello world, the end"]


def byte_bpe():
    """Qwen2/3-style: the regex split (digits one by one), then byte-level BPE; no BOS added."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=BYTE_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|begin_of_text|>",
                                   pad_token="<|endoftext|>")


def sentencepiece_bpe():
    """Gemma/Llama-2-style: spaces as ▁, BPE merges, bytes (<0xNN>) for anything not in the vocab, BOS added."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SP_SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in "▁abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("i", "n"), ("▁", "a"), ("o", "u"), ("e", "r"), ("▁", "f")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", vocab["<bos>"])])
    tok.add_special_tokens(SP_SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>", add_bos_token=True)


TOKENIZERS = {"byte_bpe": byte_bpe, "sentencepiece_bpe": sentencepiece_bpe}


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """(tokenizer kind, template name or None) -> (checkpoint folder, exported package), made once."""
    from onnxllm.exporter.export import ExportOptions, export

    made: dict = {}

    def get(kind: str, template: str | None = None):
        key = (kind, template)
        if key not in made:
            root = tmp_path_factory.mktemp(f"{kind}-{template}")
            ckpt = make_tiny_checkpoint(root, "llama", num_hidden_layers=1)
            tok = TOKENIZERS[kind]()
            assert len(tok) <= 320
            if template:
                tok.chat_template = TEMPLATES[template][0]
            tok.save_pretrained(str(ckpt))
            made[key] = ckpt, export(ckpt, root / "pkg", options=ExportOptions(verify=False))
        return made[key]

    return get


def _hf_ids(value) -> list[int]:
    """apply_chat_template(tokenize=True) returns a list in some transformers versions, a BatchEncoding in others."""
    return list(value["input_ids"] if hasattr(value, "keys") else value)


@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
def test_token_ids_equal_transformers(packages, kind):
    from transformers import AutoTokenizer

    ckpt, pkg = packages(kind)
    hf = AutoTokenizer.from_pretrained(str(ckpt))
    model = onnxllm.load(pkg)
    for text in (TEXT, " leading space", "x", "\n\n  \t"):
        expected = hf(text)["input_ids"]
        assert model.encode(text) == expected, text
        ours = model.tokenizer.decode(expected, skip_special_tokens=False)
        assert hf.decode(expected, skip_special_tokens=False) == ours
    manifest = json.loads((Path(pkg) / "onnxllm.json").read_text())
    assert manifest["add_bos_token"] == (kind == "sentencepiece_bpe")
    if kind == "sentencepiece_bpe":  # the CJK and emoji of TEXT really went through byte fallback
        assert any(model.tokenizer.id_to_token(i).startswith("<0x") for i in model.encode(TEXT))


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_and_tokenizes_like_transformers(packages, template, add_generation_prompt):
    from transformers import AutoTokenizer

    _, kind, conversations, variable_sets = TEMPLATES[template]
    ckpt, pkg = packages(kind, template)
    hf = AutoTokenizer.from_pretrained(str(ckpt))
    model = onnxllm.load(pkg)
    for name in conversations:
        for variables in variable_sets:
            messages = CONVERSATIONS[name]
            expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                              **variables.as_dict())
            assert model.render(messages, add_generation_prompt=add_generation_prompt, variables=variables) == expected
            if add_generation_prompt:
                ids = _hf_ids(hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                     **variables.as_dict()))
                assert model.encode_chat(messages, variables=variables) == ids, (name, variables)


def test_qwen3_switches_change_the_prompt(packages):
    _, pkg = packages("byte_bpe", "qwen3")
    model = onnxllm.load(pkg)
    messages = CONVERSATIONS["system_user"]
    plain = model.render(messages)
    off = model.render(messages, variables=ChatVariables(enable_thinking=False))
    tools = model.render(messages, variables=ChatVariables(tools=TOOLS))
    assert off == plain + "<think>\n\n</think>\n\n"
    assert '"name": "get_weather"' in tools and '"name": "get_weather"' not in plain


def test_gemma3_has_no_system_role_the_template_folds_it(packages):
    _, pkg = packages("sentencepiece_bpe", "gemma3")
    model = onnxllm.load(pkg)
    text = model.render(CONVERSATIONS["system_user"])
    assert "system" not in text and text.startswith("<bos><start_of_turn>user\nYou are terse.")
    with pytest.raises(onnxllm.GenerationError, match="roles must alternate"):
        model.render([{"role": "assistant", "content": "x"}])
