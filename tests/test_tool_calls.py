"""Tool-call parsing per template family, from scripted model text (no model needed)."""

from __future__ import annotations

import json

import pytest

from onnxllm.errors import GenerationError
from onnxllm.runtime.tool_calls import (FORMATS, ToolCallParser, check_tools, format_for_template,
                                        parse_tool_calls)

FMT = {f.name: f for f in FORMATS}
TOOLS = ["get_weather", "add"]
WEATHER = {"city": "Paris", "unit": "celsius"}

# (format, model text, expected visible text, expected calls as (name, arguments))
CASES = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
     "", [("get_weather", WEATHER)]),
    ("hermes", 'Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
               '</tool_call>\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>',
     "Let me check. \n", [("get_weather", WEATHER), ("add", {"a": 1, "b": 2})]),
    ("hermes", "No tools needed: 2 < 3 and <tool is a word.", "No tools needed: 2 < 3 and <tool is a word.", []),
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call> done',
     '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call> done', []),  # broken JSON stays text
    ("hermes", '<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call>',
     '<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call>', []),  # not a given tool: text
    ("hermes", '<tool_call>{"name": "add", "arguments": {"a": 1', '<tool_call>{"name": "add", "arguments": {"a": 1',
     []),  # cut off by max_tokens: text as written
    ("llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', "",
     [("get_weather", WEATHER)]),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', "",
     [("get_weather", WEATHER)]),  # <|python_tag|> is a control token: detokenization drops it
    ("llama3", '{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "get_weather", "parameters": '
               '{"city": "Paris", "unit": "celsius"}}', "", [("add", {"a": 1, "b": 2}), ("get_weather", WEATHER)]),
    ("llama3", '{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}', "", [("add", {"a": 1, "b": 2})]),
    ("llama3", "The weather in Paris is mild.", "The weather in Paris is mild.", []),
    ("llama3", "{curly} text that is not JSON", "{curly} text that is not JSON", []),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]', "",
     [("get_weather", WEATHER)]),
    ("mistral", '[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "get_weather", "arguments": '
                '{"city": "Paris", "unit": "celsius"}}]', "", [("add", {"a": 1, "b": 2}), ("get_weather", WEATHER)]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}', "", [("get_weather", WEATHER)]),
    ("mistral", "[1, 2, 3] is a list.", "[1, 2, 3] is a list.", []),
    ("mistral", "Plain answer.", "Plain answer.", []),
]


@pytest.mark.parametrize("family,text,visible,calls", CASES)
def test_whole_text(family, text, visible, calls):
    shown, found = parse_tool_calls(text, FMT[family], TOOLS)
    assert shown == visible
    assert [(c.name, c.arguments) for c in found] == calls
    assert all(c.id.startswith("call_") for c in found) and len({c.id for c in found}) == len(found)
    assert all(json.loads(c.arguments_json) == c.arguments for c in found)


@pytest.mark.parametrize("family,text,visible,calls", CASES)
@pytest.mark.parametrize("step", [1, 3, 7])
def test_streamed_in_pieces_equals_whole(family, text, visible, calls, step):
    parser = ToolCallParser(FMT[family], TOOLS)
    shown, found = [], []
    for i in range(0, len(text), step):
        delta, more = parser.feed(text[i:i + step])
        shown.append(delta)
        found += more
    delta, more = parser.finish()
    assert "".join(shown) + delta == visible
    assert [(c.name, c.arguments) for c in found + more] == calls


def test_hermes_text_before_a_call_streams_before_the_call_ends():
    parser = ToolCallParser(FMT["hermes"], TOOLS)
    assert parser.feed("Checking the weather <tool")[0] == "Checking the weather "  # "<tool" may open a call
    assert parser.feed('_call>{"name": "add", ')[0] == ""
    shown, calls = parser.feed('"arguments": {"a": 1, "b": 2}}</tool_call> ok')
    assert shown == " ok" and [c.name for c in calls] == ["add"]


def test_format_from_template_text():
    assert format_for_template("{% for tool in tools %}<tool_call>{{ tool | tojson }}</tool_call>{% endfor %}") \
        is FMT["hermes"]
    assert format_for_template("{% if tools %}[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS]{% endif %}"
                               "{{ '[TOOL_CALLS]' }}") is FMT["mistral"]
    assert format_for_template('{% if tools %}Respond with {"name": function name, "parameters": dictionary}'
                               '{% endif %}<|python_tag|>') is FMT["llama3"]
    assert format_for_template("{% for m in messages %}{{ m.content }}{% endfor %}") is None
    assert format_for_template("<tool_call> without the variable") is None
    assert format_for_template(None) is None


def test_check_tools():
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    assert check_tools(tools) == tools and check_tools(None) is None
    for bad in ("add", {"function": {}}, [{"type": "function"}], [{"type": "function", "function": {"name": ""}}]):
        with pytest.raises(GenerationError, match="tools"):
            check_tools(bad)


# -- through a Model (real tokenizer, template and loop; scripted answers) -------------------------------
HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools:\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "Call one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>"
    "{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                 "parameters": {"type": "object",
                                                                "properties": {"city": {"type": "string"}}}}}
CALL_TEXT = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


def weather_reply(prompt: str) -> str:
    """The scripted model: calls the tool when asked, answers from the tool's result once it has one."""
    if "<|im_start|>tool\n18 C" in prompt:
        return "It is 18 C in Paris."
    if "get_weather" in prompt and "weather" in prompt.split("<|im_start|>user")[-1]:
        return "Let me look. " + CALL_TEXT
    return "Hello."


@pytest.fixture(scope="module")
def hermes_package(tmp_path_factory):
    import dataclasses

    from _tiny import make_tiny_package

    from onnxllm.package import read_manifest, write_manifest

    pkg = make_tiny_package(tmp_path_factory.mktemp("hermes"), "llama", vocab_size=263, max_position_embeddings=1024)
    (pkg / "chat_template.jinja").write_text(HERMES_TEMPLATE, encoding="utf-8")
    write_manifest(pkg, dataclasses.replace(read_manifest(pkg), chat_template="chat_template.jinja"))
    return pkg


def test_model_generate_with_tools(hermes_package):
    from _scripted import scripted_model

    model = scripted_model(hermes_package, weather_reply)
    assert model.tool_format is FMT["hermes"]
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    result = model.generate(messages, tools=[WEATHER_TOOL], max_tokens=200)
    assert result.text == "Let me look. "
    assert [(c.name, c.arguments) for c in result.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert '"name": "get_weather"' in model.session.prompts[-1]  # the tools reached the template
    # without tools the same text is only text, and the template got no tool list
    plain = model.generate(messages, max_tokens=200)
    assert plain.tool_calls == [] and plain.text == "Hello."
    streamed = list(model.stream(messages, tools=[WEATHER_TOOL], max_tokens=200))
    assert "".join(c.text for c in streamed) == "Let me look. "
    assert [c.name for chunk in streamed for c in chunk.tool_calls] == ["get_weather"]


def test_chat_round_trip_with_a_tool_result(hermes_package):
    from _scripted import scripted_model

    model = scripted_model(hermes_package, weather_reply)
    chat = model.chat(tools=[WEATHER_TOOL])
    first = chat.ask("What is the weather in Paris?", max_tokens=200)
    (call,) = first.tool_calls
    assert chat.messages[-1]["tool_calls"] == [call.as_message()]
    chat.add_tool_result(call.id, "18 C", name="get_weather")
    answer = "".join(c.text for c in chat.respond(max_tokens=200))
    assert answer == "It is 18 C in Paris."
    assert CALL_TEXT in model.session.prompts[-1]  # the call went back in as the assistant's turn
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "tool", "assistant"]


def test_tools_on_a_model_whose_template_takes_none(tiny_llama):
    import onnxllm

    model = onnxllm.load(tiny_llama)
    with pytest.raises(GenerationError, match="tools"):
        model.generate([{"role": "user", "content": "hi"}], tools=[WEATHER_TOOL])


def test_tool_call_round_trip_through_the_server(hermes_package):
    """The openai client sends tools, gets tool_calls (whole and streamed), sends the result back as a tool message."""
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    from _scripted import scripted_model
    from _server import LiveServer

    from onnxllm.serve import ServeOptions
    from onnxllm.serve.app import create_app
    from onnxllm.serve.registry import Registry

    options = ServeOptions(models=(str(hermes_package),))
    registry = Registry({"tools": hermes_package}, lambda path: scripted_model(path, weather_reply), max_queue=4,
                        keep_alive_s=None)
    with LiveServer(options, app=create_app(registry, options)) as live:
        client = live.openai()
        ask = [{"role": "user", "content": "What is the weather in Paris?"}]
        first = client.chat.completions.create(model="tools", messages=ask, tools=[WEATHER_TOOL], max_tokens=200)
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look. "
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"} and call.id.startswith("call_")

        chunks = list(client.chat.completions.create(model="tools", messages=ask, tools=[WEATHER_TOOL],
                                                     max_tokens=200, stream=True))
        deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
        assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == \
            [(0, "get_weather", {"city": "Paris"})]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Let me look. "
        assert chunks[-1].choices[0].finish_reason == "tool_calls"

        back = [*ask, choice.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "18 C"}]
        final = client.chat.completions.create(model="tools", messages=back, tools=[WEATHER_TOOL], max_tokens=200)
        assert final.choices[0].message.content == "It is 18 C in Paris."
        assert final.choices[0].finish_reason == "stop" and not final.choices[0].message.tool_calls

        # tool_choice "none": the tools never reach the model, and its text is only text
        none = client.chat.completions.create(model="tools", messages=ask, tools=[WEATHER_TOOL], tool_choice="none",
                                              max_tokens=200)
        assert none.choices[0].message.content == "Hello." and not none.choices[0].message.tool_calls
        import openai

        with pytest.raises(openai.BadRequestError, match="tool_choice"):  # forcing a call needs tools to call
            client.chat.completions.create(model="tools", messages=ask, tool_choice="required")


def test_format_of_the_real_family_templates():
    """The Qwen3 and Llama 3.1 templates that test_family_tokenizers renders like transformers."""
    from _templates import LLAMA31, QWEN3

    assert format_for_template(QWEN3) is FMT["hermes"]
    assert format_for_template(LLAMA31) is FMT["llama3"]
