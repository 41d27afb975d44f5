"""Structured output with SmolLM2 (real tier): 55 JSON schemas, regular expressions and grammars, greedy and
sampled, drafts on and off. Every answer that ends on EOS must parse and validate; an answer cut by max_tokens
must say "length", and those must be few."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import jsonschema
import pytest

import onnxllm

pytestmark = pytest.mark.real

CASES = json.loads((Path(__file__).parent / "fixtures" / "structured_schemas.json").read_text(encoding="utf-8"))
MAX_TOKENS = 128


@pytest.fixture(scope="module")
def smollm2(smollm2_package):
    return onnxllm.load(smollm2_package)


def _prompt(case: dict) -> str:
    return f"{case['prompt']} Reply with JSON only, matching this schema: {json.dumps(case['schema'])}"


def _validator(schema: dict):
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


@pytest.mark.parametrize("sampling", [
    {"temperature": 0.0, "draft_tokens": 8},
    {"temperature": 1.0, "draft_tokens": 0},
], ids=["greedy-drafts", "t1-no-drafts"])
def test_every_schema_gives_valid_json(smollm2, sampling):
    assert len(CASES) >= 50
    cut = []
    for i, case in enumerate(CASES):
        r = smollm2.generate(_prompt(case), chat=True, json_schema=case["schema"], max_tokens=MAX_TOKENS, seed=i,
                             **sampling)
        if r.finish_reason == "length":
            assert len(r.token_ids) == MAX_TOKENS
            cut.append(case["name"])
            continue
        assert r.finish_reason == "eos", (case["name"], r.finish_reason)
        errors = [e.message for e in _validator(case["schema"]).iter_errors(json.loads(r.text))]
        assert not errors, (case["name"], r.text, errors)
    assert len(cut) <= len(CASES) // 10, cut  # a long free-text string may run to max_tokens, rarely


def test_drafts_on_and_off_and_sampling_settings_on_a_subset(smollm2):
    settings = [{"temperature": 0.0, "draft_tokens": 0}, {"temperature": 1.0, "draft_tokens": 8},
                {"temperature": 0.7, "top_k": 20, "draft_tokens": 8}, {"temperature": 1.0, "top_p": 0.9, "min_p": 0.05},
                {"temperature": 0.8, "repetition_penalty": 1.2, "presence_penalty": 0.3, "frequency_penalty": 0.3}]
    cut = 0
    subset = CASES[::11]
    for i, case in enumerate(subset):
        for s in settings:
            r = smollm2.generate(_prompt(case), chat=True, json_schema=case["schema"], max_tokens=MAX_TOKENS,
                                 seed=100 + i, **s)
            if r.finish_reason == "length":
                cut += 1
                continue
            assert r.finish_reason == "eos"
            _validator(case["schema"]).validate(json.loads(r.text))
    assert cut <= len(subset) * len(settings) // 10


def test_drafts_pay_inside_json(smollm2):
    """The grammar's forced tokens (keys, separators) are drafted: fewer passes than tokens."""
    case = next(c for c in CASES if c["name"] == "deep_nest")
    r = smollm2.generate(_prompt(case), chat=True, json_schema=case["schema"], max_tokens=MAX_TOKENS)
    assert r.finish_reason == "eos"
    t = r.timings
    assert t.accepted_tokens > 0 and t.decode_passes < t.generated_tokens - 1


REGEXES = [
    ("What is today's date?", r"[0-9]{4}-[0-9]{2}-[0-9]{2}"),
    ("Is water wet? Answer yes or no.", r"(yes|no)"),
    ("Give a US phone number.", r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"),
    ("Name three colors.", r"[a-z]{2,12}, [a-z]{2,12}, [a-z]{2,12}"),
    ("What time is it?", r"([01][0-9]|2[0-3]):[0-5][0-9]"),
    ("What is 7 times 8?", r"The answer is [0-9]{1,3}\."),
    ("Give an email address for Alice.", r"[a-z]{1,12}@[a-z]{1,12}\.(com|org)"),
    ("Rate this restaurant from 1 to 5 stars.", r"[1-5] stars?"),
    ("Write a short sentence about cats.", r"[A-Z][a-z ,]{5,60}\."),
    ("Give a hex color.", r"#[0-9a-f]{6}"),
]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_regexes_match(smollm2, temperature):
    for i, (prompt, regex) in enumerate(REGEXES):
        r = smollm2.generate(prompt, chat=True, regex=regex, max_tokens=64, temperature=temperature, seed=i)
        assert r.finish_reason == "eos", (regex, r.text)
        assert re.fullmatch(regex, r.text), (regex, r.text)


# (prompt, grammar, oracle): Lark and GBNF; the oracle checks the text without the constraint engine
GRAMMARS = [
    ("Is Paris in France?", 'root ::= ("yes" | "no") ", because " [a-z ]{3,40} "."',
     lambda t: re.fullmatch(r"(yes|no), because [a-z ]{3,40}\.", t)),
    ("List three fruits.", 'start: item (", " item)~2\nitem: /[a-z]{2,12}/',
     lambda t: re.fullmatch(r"[a-z]{2,12}(, [a-z]{2,12}){2}", t)),
    ("Write an arithmetic expression that equals 10.",
     'start: expr\nexpr: term (("+" | "-") term)*\nterm: factor (("*" | "/") factor)*\n'
     'factor: NUMBER | "(" expr ")"\nNUMBER: /[0-9]{1,3}/',
     lambda t: re.fullmatch(r"[0-9()+\-*/]+", t)
     and isinstance(ast.parse(t, mode="eval").body, (ast.BinOp, ast.Constant))),
    ("Give settings for a game as key=value lines.",
     'root ::= line line line\nline ::= [a-z_]{1,12} "=" [0-9]{1,4} "\\n"',
     lambda t: re.fullmatch(r"([a-z_]{1,12}=[0-9]{1,4}\n){3}", t)),
    ("Write a SQL query that selects names from the users table.",
     'start: "SELECT " cols " FROM " NAME (" WHERE " NAME " = " VALUE)? ";"\ncols: NAME (", " NAME)*\n'
     'NAME: /[a-z_]{1,16}/\nVALUE: /[0-9]{1,6}/',
     lambda t: re.fullmatch(r"SELECT [a-z_]{1,16}(, [a-z_]{1,16})* FROM [a-z_]{1,16}"
                            r"( WHERE [a-z_]{1,16} = [0-9]{1,6})?;", t)),
    ("Write a CSV row about a book: title, year, rating.",
     'root ::= title "," year "," rating\ntitle ::= [A-Za-z ]{1,30}\nyear ::= [12] [0-9] [0-9] [0-9]\n'
     'rating ::= [0-5] "." [0-9]',
     lambda t: re.fullmatch(r"[A-Za-z ]{1,30},[12][0-9]{3},[0-5]\.[0-9]", t)),
]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_grammars_hold(smollm2, temperature):
    for i, (prompt, grammar, oracle) in enumerate(GRAMMARS):
        r = smollm2.generate(prompt, chat=True, grammar=grammar, max_tokens=96, temperature=temperature, seed=i)
        assert r.finish_reason == "eos", (grammar, r.text)
        assert oracle(r.text), (grammar, r.text)


def test_stream_and_chat_hold_the_schema(smollm2):
    case = next(c for c in CASES if c["name"] == "order")
    chunks = list(smollm2.stream(_prompt(case), chat=True, json_schema=case["schema"], max_tokens=MAX_TOKENS))
    assert chunks[-1].finish_reason == "eos"
    _validator(case["schema"]).validate(json.loads("".join(c.text for c in chunks)))
    chat = smollm2.chat(system="You answer in JSON.")
    first = chat.ask(_prompt(case), json_schema=case["schema"], max_tokens=MAX_TOKENS)
    second = chat.ask("Now another one.", json_schema=case["schema"], max_tokens=MAX_TOKENS, temperature=1.0, seed=3)
    for r in (first, second):
        assert r.finish_reason == "eos"
        _validator(case["schema"]).validate(json.loads(r.text))
    assert second.timings.cached_tokens > 0  # the constraint does not stop the KV cache carrying over


def test_max_tokens_cut_is_length(smollm2):
    case = next(c for c in CASES if c["name"] == "recipe")
    r = smollm2.generate(_prompt(case), chat=True, json_schema=case["schema"], max_tokens=6)
    assert r.finish_reason == "length" and len(r.token_ids) == 6


def test_server_returns_schema_valid_content_through_the_openai_client(smollm2_package):
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    from _server import LiveServer

    from onnxllm.serve import ServeOptions

    case = next(c for c in CASES if c["name"] == "extraction")
    with LiveServer(ServeOptions(models=(str(smollm2_package),))) as live:
        client = live.openai()
        for temperature in (0.0, 1.0):
            answer = client.chat.completions.create(
                model=smollm2_package.name, messages=[{"role": "user", "content": _prompt(case)}],
                max_tokens=MAX_TOKENS, temperature=temperature, seed=7,
                response_format={"type": "json_schema",
                                 "json_schema": {"name": case["name"], "schema": case["schema"], "strict": True}})
            choice = answer.choices[0]
            assert choice.finish_reason == "stop", choice
            _validator(case["schema"]).validate(json.loads(choice.message.content))
