"""Structured output, unit tier: the constraint (llguidance over a real byte-level tokenizer), its mask in the
generation loop under every sampling setting and with drafts (scripted sessions), the tiny random model
through the API and the CLI, and bad input."""

from __future__ import annotations

import json
import sys

import jsonschema
import numpy as np
import pytest
from _helpers import cli, with_template

import onnxllm
from onnxllm.errors import ConstraintError
from onnxllm.runtime.constraints import ConstraintCompiler, constraint_spec
from onnxllm.runtime.generate import GenerationConfig, TokenPicker, generate_tokens

EOS = 256  # the tiny tokenizer's <|endoftext|>
VOCAB = 320  # the tiny model's logits (the tokenizer has 263 tokens; the rest must never be allowed)
# Every path through this schema is short: an answer must end, whatever the logits.
BOUNDED = {"type": "object", "properties": {
    "a": {"type": "integer", "minimum": 0, "maximum": 99},
    "b": {"enum": ["x", "yy", "zzz"]},
    "c": {"type": "boolean"},
    "d": {"type": "string", "maxLength": 3}}, "required": ["a", "b", "c", "d"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_llama):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tiny_llama / "tokenizer.json"))


@pytest.fixture(scope="module")
def compiler(tiny_tokenizer):
    return ConstraintCompiler(tiny_tokenizer, n_vocab=VOCAB, eos_ids=[EOS])


def _spec(**kw):
    return constraint_spec(**kw)


def _text(tokenizer, ids):
    return tokenizer.decode([t for t in ids if t != EOS])


# -- the constraint on its own ---------------------------------------------------------------------
def test_mask_allows_only_what_keeps_the_text_valid_and_eos_only_at_the_end(compiler, tiny_tokenizer):
    c = compiler.compile(_spec(json_schema=json.dumps({"type": "object", "properties": {"n": {"type": "integer"}},
                                                       "required": ["n"], "additionalProperties": False})))
    first = np.flatnonzero(c.allowed([]))
    assert [tiny_tokenizer.decode([int(t)]) for t in first] == ["{"]
    ids = tiny_tokenizer.encode('{"n": 42}').ids
    for i in range(len(ids)):
        mask = c.allowed(ids[:i])
        assert mask[ids[i]] and not mask[EOS] and not mask[263:].any()
    assert np.flatnonzero(c.allowed(ids)).tolist() == [EOS]  # complete: only EOS may follow
    assert c.is_accepting(ids)
    # going back (the loop dropped tokens) rolls the matcher back: "{" again allows only the key's quote
    assert not c.is_accepting(ids[:1]) and c.allowed(ids[:1]).sum() >= 1
    assert c.allowed(ids)[EOS]


def test_process_masks_logits_to_minus_inf_and_keeps_the_rest(compiler, tiny_tokenizer):
    c = compiler.compile(_spec(regex="ab+"))
    logits = np.random.default_rng(0).normal(size=VOCAB).astype(np.float32)
    out = c.process(logits, tiny_tokenizer.encode("ab").ids)
    allowed = np.isfinite(out)
    assert set(np.flatnonzero(allowed)) == {tiny_tokenizer.token_to_id("b"), EOS}
    np.testing.assert_array_equal(out[allowed], logits[allowed])
    assert np.isfinite(logits).all()  # the input is not written into


def test_draft_is_cut_at_the_first_guess_that_leaves_the_constraint(compiler, tiny_tokenizer):
    c = compiler.compile(_spec(regex="[0-9]{2,4};"))
    digit, semi, letter = (tiny_tokenizer.token_to_id(ch) for ch in "7;x")
    assert c.valid_prefix([], [digit, digit, letter, digit]) == 2
    assert c.valid_prefix([digit], [digit, digit, digit, digit]) == 3  # at most four digits
    assert c.valid_prefix([digit, digit], [semi, EOS]) == 1  # EOS is never drafted: the model ends the answer
    # the loop's picker drafts what the constraint forces when there is something, else the lookup's guess, cut
    picker = TokenPicker(GenerationConfig(), [5, 6], constraint=c)
    assert picker.draft([digit, letter], room=4) == [digit]
    for _ in range(4):
        picker.given_out(digit)
    assert picker.draft([letter], room=4) == [semi]  # four digits: only ";" can follow
    assert TokenPicker(GenerationConfig(), [5, 6]).draft([letter], room=4) == [letter]  # unconstrained: as is


def test_json_object_and_grammars_in_lark_and_gbnf(compiler, tiny_tokenizer):
    c = compiler.compile(_spec(json_object=True))
    ids = tiny_tokenizer.encode('{"k": [1, "v"]}').ids
    assert c.valid_prefix([], ids) == len(ids)
    assert c.valid_prefix([], tiny_tokenizer.encode('[1]').ids) == 0  # an object, not any JSON
    lark = compiler.compile(_spec(grammar='start: ("yes" | "no") "!"'))
    gbnf = compiler.compile(_spec(grammar='root ::= ("yes" | "no") "!"'))
    for c in (lark, gbnf):
        ids = tiny_tokenizer.encode("no!").ids
        assert c.valid_prefix([], ids) == len(ids) and c.is_accepting(ids)
        assert c.valid_prefix([], tiny_tokenizer.encode("maybe").ids) == 0


@pytest.mark.parametrize("options, needle", [
    ({"json_schema": "{not json"}, "json_schema is not valid JSON"),
    ({"json_schema": "[1, 2]"}, "must be a JSON object"),
    ({"json_schema": '{"type": "objectx"}'}, "invalid json schema: Invalid type: objectx"),
    ({"json_schema": '{"type": "integer", "minimum": 5, "maximum": 1}'}, "Unsatisfiable schema"),
    ({"json_schema": '{"type": "string", "pattern": "(("}'}, "unclosed group"),
    ({"json_schema": '{"type": "string", "format": "colour"}'}, "Unknown format: colour"),
    ({"json_schema": '{"properties": {"a": {"$ref": "#/defs/x"}}}'}, "does not exist"),
    ({"regex": "a(("}, "invalid regex"),
    ({"regex": ""}, "regex must be a non-empty string"),
    ({"grammar": "start: foo"}, 'unknown name: "foo"'),
    ({"grammar": 'root ::= ( "yes" '}, "invalid grammar: Expected ')'"),
    ({"regex": "a", "grammar": "start: \"a\""}, "one constraint at a time, got regex and grammar"),
    ({"json_schema": "{}", "json_object": True}, "got json_schema and json_object"),
    ({"json_object": "yes"}, "json_object must be True or False"),
])
def test_bad_constraints_are_one_line_errors(compiler, options, needle):
    with pytest.raises(ConstraintError) as info:
        compiler.grammar(constraint_spec(**options))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_config_takes_a_dict_or_pydantic_model_and_stays_immutable():
    pydantic = pytest.importorskip("pydantic")

    class Point(pydantic.BaseModel):
        x: int
        y: int

    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    config = GenerationConfig().updated(json_schema=schema)
    schema["properties"]["y"] = {}
    assert json.loads(config.json_schema) == {"type": "object", "properties": {"x": {"type": "integer"}}}
    assert config.constraint().kind == "json_schema"
    assert json.loads(GenerationConfig(json_schema=Point).json_schema)["required"] == ["x", "y"]
    assert GenerationConfig().constraint() is None
    with pytest.raises(ConstraintError, match="one constraint at a time"):
        GenerationConfig(regex="a", json_object=True).validate()


def test_without_llguidance_the_error_says_what_to_install(monkeypatch, tiny_tokenizer):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance now raises ImportError
    with pytest.raises(ConstraintError, match=r"pip install 'onnxllm\[structured\]'"):
        ConstraintCompiler(tiny_tokenizer, n_vocab=VOCAB, eos_ids=[EOS])


# -- the mask in the loop (scripted sessions) ---------------------------------------------------
class RandomSession:
    """Seeded random logits over the tiny vocabulary with one strong favourite that is outside the grammar ('x'),
    and the speculative interface: forward(ids, all_logits=True) gives each fed position's logits."""

    can_verify = True
    context = 256

    def __init__(self, favourite: int, seed: int = 0):
        self.favourite, self.seed = favourite, seed
        self.tokens: list[int] = []
        self.fed: list[list[int]] = []
        self.history: list[list[int]] = []  # the cache before each pass

    def _logits(self, position: int) -> np.ndarray:
        out = np.random.default_rng([self.seed, self.tokens[position], position]).normal(size=VOCAB)
        out[self.favourite] = 8.0  # unconstrained, the model says this almost always
        return out.astype(np.float32)

    def forward(self, ids, *, all_logits=False):
        self.history.append(list(self.tokens))
        self.fed.append(list(ids))
        start = len(self.tokens)
        self.tokens.extend(ids)
        rows = np.stack([self._logits(i) for i in range(start, len(self.tokens))])
        return rows if all_logits else rows[-1]

    def common_prefix(self, ids):
        return next((i for i, (a, b) in enumerate(zip(self.tokens, ids)) if a != b), min(len(self.tokens), len(ids)))

    def rewind(self, n):
        del self.tokens[n:]

    def reserve(self, total):
        assert total <= self.context


SAMPLING = [
    {"temperature": 0.0},
    {"temperature": 1.0, "seed": 1},
    {"temperature": 1.0, "top_k": 5, "seed": 2},
    {"temperature": 0.8, "top_p": 0.9, "seed": 3},
    {"temperature": 1.0, "min_p": 0.1, "seed": 4},
    {"temperature": 1.0, "repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.5, "seed": 5},
]


@pytest.mark.parametrize("draft_tokens", [0, 8])
@pytest.mark.parametrize("sampling", SAMPLING, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_mask_holds_under_every_sampling_setting_with_and_without_drafts(compiler, tiny_tokenizer, sampling,
                                                                          draft_tokens):
    x = tiny_tokenizer.token_to_id("x")
    prompt = tiny_tokenizer.encode('x{"a": 1, "b": "x"}xxx{"a": 1, "b": "x"}x').ids  # lookup drafts from this
    config = GenerationConfig(max_tokens=64, draft_tokens=draft_tokens, json_schema=json.dumps(BOUNDED), **sampling)
    free = [e.token for e in generate_tokens(RandomSession(x), prompt, config) if e.token is not None]
    assert x in free[:4]  # without the mask, the session leaves the grammar at once
    session = RandomSession(x)
    constraint = compiler.compile(config.constraint())
    events = list(generate_tokens(session, prompt, config, eos_ids=[EOS], constraint=constraint))
    tokens = [e.token for e in events if e.token is not None]
    assert events[-1].finish_reason == "eos"
    jsonschema.validate(json.loads(_text(tiny_tokenizer, tokens)), BOUNDED)
    # every pass fed only tokens inside the grammar: a guess that leaves it ended the draft there
    check = compiler.compile(config.constraint())
    for fed, before in zip(session.fed[1:], session.history[1:]):
        generated = before[len(prompt):] + fed[:1]  # fed[0]: the last token given out, then the guesses
        assert check.valid_prefix(generated, fed[1:]) == len(fed) - 1, (generated, fed)
    if draft_tokens:
        t = events[-1].timings
        assert t.drafted_tokens > 0 and t.accepted_tokens > 0  # forced keys and separators were drafted


def test_max_tokens_cut_says_length_never_eos(compiler, tiny_tokenizer):
    config = GenerationConfig(max_tokens=5, json_schema=json.dumps(BOUNDED))
    events = list(generate_tokens(RandomSession(0), [1, 2], config, eos_ids=[EOS],
                                  constraint=compiler.compile(config.constraint())))
    assert events[-1].finish_reason == "length" and len([e for e in events if e.token is not None]) == 5


# -- the tiny random model through the API and the CLI ---------------------------------------------
@pytest.mark.parametrize("sampling", SAMPLING, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_tiny_model_output_validates_in_generate_stream_and_chat(tiny_llama, tmp_path, sampling):
    m = onnxllm.load(with_template(tiny_llama, tmp_path))
    options = {"max_tokens": 60, "json_schema": BOUNDED, **sampling}
    results = [m.generate("the cat sat", **options)]
    chunks = list(m.stream("on the mat", **options))
    results.append(onnxllm.GenerationResult("".join(c.text for c in chunks), [], chunks[-1].finish_reason))
    results.append(m.chat(system="json").ask("fill it in", **options))
    for r in results:
        assert r.finish_reason == "eos", r
        jsonschema.validate(json.loads(r.text), BOUNDED)
    free = m.generate("the cat sat", max_tokens=20, **sampling)
    with pytest.raises(json.JSONDecodeError):
        json.loads(free.text)  # the random model alone writes no JSON


def test_tiny_model_regex_and_grammar(tiny_llama):
    m = onnxllm.load(tiny_llama)
    r = m.generate("the", regex=r"[a-c]{3}-[0-9]{2}", max_tokens=20, temperature=1.0, seed=0)
    assert r.finish_reason == "eos" and len(r.text) == 6 and r.text[3] == "-"
    g = m.generate("the", grammar='root ::= ("on" | "off") " " [0-9]', max_tokens=20)
    assert g.finish_reason == "eos" and g.text.split(" ")[0] in ("on", "off")


def test_cli_run_with_each_constraint(tiny_llama, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(BOUNDED))
    grammar = tmp_path / "g.gbnf"
    grammar.write_text('root ::= ("on" | "off") "!"')
    for args in (["--json-schema", schema], ["--json-schema", json.dumps(BOUNDED)], ["--json-object"]):
        proc = cli("run", tiny_llama, "the cat", "--max-tokens", "200", "--json", *args)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["finish_reason"] in ("eos", "length")
        if out["finish_reason"] == "eos":
            document = json.loads(out["text"])
            if args[0] == "--json-schema":
                jsonschema.validate(document, BOUNDED)
    proc = cli("run", tiny_llama, "the cat", "--max-tokens", "20", "--grammar", grammar)
    assert proc.returncode == 0 and proc.stdout.strip() in ("on!", "off!"), proc.stderr
    proc = cli("run", tiny_llama, "the cat", "--max-tokens", "20", "--regex", "[0-9]{3}")
    assert proc.returncode == 0 and proc.stdout.strip().isdigit() and len(proc.stdout.strip()) == 3


@pytest.mark.parametrize("args, needle", [
    (["--json-schema", '{"type": "objectx"}'], "invalid json schema: Invalid type: objectx"),
    (["--json-schema", "missing.json"], "missing.json"),
    (["--regex", "a(("], "invalid regex"),
    (["--grammar", "GRAMMAR"], 'unknown name: "foo"'),
    (["--regex", "a", "--json-object"], "one constraint at a time"),
])
def test_cli_bad_constraint_is_one_line_before_generation(tiny_llama, tmp_path, args, needle):
    bad = tmp_path / "bad.lark"
    bad.write_text("start: foo\n")
    args = [str(bad) if a == "GRAMMAR" else a for a in args]
    proc = cli("run", tiny_llama, "the cat", *args, input="")
    assert proc.returncode == 1, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not proc.stdout.strip()


# -- tool_choice and the server's response_format (tiny random model, real server, openai client) -------
PICK_TOOL = {"type": "function", "function": {"name": "pick", "description": "Pick a colour, a count", "parameters": {
    "type": "object", "properties": {"colour": {"enum": ["red", "green"]}, "n": {"type": "integer", "minimum": 1,
                                                                                  "maximum": 9}},
    "required": ["colour", "n"], "additionalProperties": False}}}
NOTE_TOOL = {"type": "function", "function": {"name": "note", "parameters": {
    "type": "object", "properties": {"text": {"type": "string", "maxLength": 8}}, "required": ["text"],
    "additionalProperties": False}}}


HERMES_TEMPLATE = (  # the shape of Qwen's and Hermes' templates: tools listed, calls as <tool_call>{...}</tool_call>
    "{%- if tools %}<|im_start|>system\nTools:\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "Call one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def hermes_tiny(tmp_path_factory):
    """The tiny random llama with a Hermes-style template (tools, <tool_call>); its vocabulary = the tokenizer's."""
    import dataclasses

    from _tiny import make_tiny_package

    from onnxllm.package import read_manifest, write_manifest

    pkg = make_tiny_package(tmp_path_factory.mktemp("hermes_tiny"), "llama", vocab_size=263,
                            max_position_embeddings=1024)
    (pkg / "chat_template.jinja").write_text(HERMES_TEMPLATE, encoding="utf-8")
    write_manifest(pkg, dataclasses.replace(read_manifest(pkg), chat_template="chat_template.jinja"))
    return pkg


def _arguments_valid(call, tools) -> None:
    tool = next(t["function"] for t in tools if t["function"]["name"] == call.name)
    jsonschema.validate(call.arguments, tool["parameters"])


def test_tool_choice_forces_a_valid_call(hermes_tiny):
    m = onnxllm.load(hermes_tiny)
    ask = [{"role": "user", "content": "pick one"}]
    tools = [PICK_TOOL, NOTE_TOOL]
    free = m.generate(ask, tools=tools, max_tokens=40, seed=0, temperature=1.0)
    assert free.tool_calls == []  # the random model alone never writes a call
    for choice, names in (("required", {"pick", "note"}), ("note", {"note"}), ("pick", {"pick"})):
        for seed in range(3):
            r = m.generate(ask, tools=tools, tool_choice=choice, max_tokens=120, temperature=1.0, seed=seed)
            assert r.finish_reason == "eos" and len(r.tool_calls) == 1 and r.text.strip() == "", r
            assert r.tool_calls[0].name in names
            _arguments_valid(r.tool_calls[0], tools)
    with pytest.raises(ConstraintError, match="'other', which is not among the tools"):
        m.generate(ask, tools=tools, tool_choice="other")
    with pytest.raises(onnxllm.GenerationError, match="needs tools"):
        m.generate(ask, tool_choice="required")


def test_server_response_format_and_tool_choice_through_the_openai_client(hermes_tiny):
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from _server import LiveServer

    from onnxllm.serve import ServeOptions

    with LiveServer(ServeOptions(models=(str(hermes_tiny),))) as live:
        client = live.openai()
        name = hermes_tiny.name
        ask = [{"role": "user", "content": "fill it in"}]
        for strict in (True, False):
            answer = client.chat.completions.create(
                model=name, messages=ask, max_tokens=80, temperature=1.0, seed=int(strict),
                response_format={"type": "json_schema", "json_schema": {"name": "bounded", "schema": BOUNDED,
                                                                        "strict": strict}})
            assert answer.choices[0].finish_reason == "stop"
            jsonschema.validate(json.loads(answer.choices[0].message.content), BOUNDED)
        chunks = list(client.chat.completions.create(
            model=name, messages=ask, max_tokens=80, stream=True,
            response_format={"type": "json_schema", "json_schema": {"name": "bounded", "schema": BOUNDED}}))
        jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks)), BOUNDED)
        anything = client.chat.completions.create(model=name, messages=ask, max_tokens=200,
                                                  response_format={"type": "json_object"})
        if anything.choices[0].finish_reason == "stop":  # a random model may write one long string
            assert isinstance(json.loads(anything.choices[0].message.content), dict)
        else:
            assert anything.choices[0].finish_reason == "length"
        for choice in ("required", {"type": "function", "function": {"name": "pick"}}):
            called = client.chat.completions.create(model=name, messages=ask, tools=[PICK_TOOL, NOTE_TOOL],
                                                    tool_choice=choice, max_tokens=120)
            c = called.choices[0]
            assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
            call = c.message.tool_calls[0]
            tool = next(t for t in (PICK_TOOL, NOTE_TOOL) if t["function"]["name"] == call.function.name)
            jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
            if isinstance(choice, dict):
                assert call.function.name == "pick"
        with pytest.raises(openai.BadRequestError, match="Invalid type: objectx"):
            client.chat.completions.create(model=name, messages=ask, response_format={
                "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "objectx"}}})
        with pytest.raises(openai.BadRequestError, match="tool_choice"):
            client.chat.completions.create(model=name, messages=ask, tool_choice="required")
