"""Packages load in onnxruntime-genai (og.Model) through genai_config.json and give the same greedy tokens."""

from __future__ import annotations

import pytest

import onnxllm

og = pytest.importorskip("onnxruntime_genai")


def _genai_greedy(package, prompt_ids, n):
    model = og.Model(str(package))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt_ids) + n)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt_ids)
    out = []
    while not generator.is_done() and len(out) < n:
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_tiny_package_in_genai(request, fixture):
    package = request.getfixturevalue(fixture)
    model = onnxllm.load(package)
    prompt = model.encode("the theory of")
    ours = model.generate("the theory of", max_tokens=16)
    theirs = _genai_greedy(package, prompt, len(ours.token_ids) + (ours.finish_reason == "eos"))
    assert theirs[: len(ours.token_ids)] == ours.token_ids


@pytest.mark.real
def test_smollm2_in_genai(smollm2_package, reference):
    for case in reference["greedy_fp32"]:
        model = og.Model(str(smollm2_package))
        ids = list(og.Tokenizer(model).encode(case["prompt"]))
        assert ids == next(t["ids"] for t in reference["tokenize"] if t["text"] == case["prompt"])
        assert _genai_greedy(smollm2_package, ids, 32)[: len(case["new_token_ids"])] == case["new_token_ids"]
