"""The server on SmolLM2 (real tier): exact greedy answers through the real openai client, concurrency,
cancel on disconnect. Runs with `-m real`; shapes and errors are in test_serve.py on a tiny model."""

from __future__ import annotations

import concurrent.futures

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")

from _server import LiveServer  # noqa: E402

import onnxllm  # noqa: E402
from onnxllm.serve import ServeOptions  # noqa: E402

pytestmark = pytest.mark.real
NAME = "pkg"  # the smollm2_package fixture's folder name
QUESTIONS = ["What is the capital of France?", "Name a primary color.", "What is 2 + 2?", "Say hello in Spanish.",
             "What do bees make?", "Which planet is red?", "What is ice made of?", "Name a fruit that is yellow."]


@pytest.fixture(scope="module")
def direct(smollm2_package):
    return onnxllm.load(smollm2_package)


@pytest.fixture(scope="module")
def server(smollm2_package):
    with LiveServer(ServeOptions(models=(str(smollm2_package),))) as live:
        yield live


def _messages(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def test_greedy_chat_streamed_equals_whole_equals_api(server, direct):
    client = server.openai()
    expected = direct.generate(_messages(QUESTIONS[0]), max_tokens=24)
    assert "Paris" in expected.text
    whole = client.chat.completions.create(model=NAME, messages=_messages(QUESTIONS[0]), max_tokens=24,
                                           temperature=0)
    streamed = list(client.chat.completions.create(model=NAME, messages=_messages(QUESTIONS[0]), max_tokens=24,
                                                   temperature=0, stream=True,
                                                   stream_options={"include_usage": True}))
    assert whole.choices[0].message.content == expected.text
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected.text
    assert whole.usage.completion_tokens == streamed[-1].usage.completion_tokens == len(expected.token_ids)
    assert whole.usage.prompt_tokens == len(direct.encode_chat(_messages(QUESTIONS[0])))
    assert [m.id for m in client.models.list()] == [NAME]


def test_eight_concurrent_streaming_clients_get_their_own_answers(server, direct):
    expected = {q: direct.generate(_messages(q), max_tokens=16).text for q in QUESTIONS}

    def ask(question: str) -> str:
        stream = server.openai().chat.completions.create(model=NAME, messages=_messages(question), max_tokens=16,
                                                         stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with concurrent.futures.ThreadPoolExecutor(len(QUESTIONS)) as pool:
        answers = dict(zip(QUESTIONS, pool.map(ask, QUESTIONS)))
    assert answers == expected
    assert len(set(answers.values())) == len(QUESTIONS)


def test_disconnect_after_three_chunks_frees_the_model(server, direct):
    before = server.wait_idle(NAME)
    stream = server.openai().chat.completions.create(
        model=NAME, messages=_messages("Write a long story about a dragon who learns to bake bread."),
        max_tokens=400, stream=True)
    for n, _ in enumerate(stream, 1):
        if n == 3:
            break
    stream.close()
    after = server.wait_idle(NAME)
    assert after["cancelled"] == before["cancelled"] + 1
    last = server.registry.slot(NAME).last_finish
    assert last.finish_reason == "cancelled"
    # the client read 2 tokens (the first chunk is the role); the server stops within a token or a draft
    # pass of noticing, far before max_tokens
    assert last.timings.generated_tokens < 40, last.timings
    # the next request starts at once (nothing ahead of it) and gets its exact answer
    answer = server.openai().chat.completions.create(model=NAME, messages=_messages(QUESTIONS[2]), max_tokens=16)
    assert answer.choices[0].message.content == direct.generate(_messages(QUESTIONS[2]), max_tokens=16).text
