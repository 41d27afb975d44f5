"""OpenAI's request and response shapes, declared once (pydantic, OpenAI's field names).

Routes read requests through these models and write responses with them; nothing else in the
server spells a field name. To add a request field (say `response_format: json_schema`), add it
here and map it in `generation_options` / the route that uses it.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    # Apps send fields this server does not use (user, metadata, store, ...): ignore them, as
    # llama.cpp's and vLLM's OpenAI-compatible servers do, rather than break those apps.
    model_config = ConfigDict(extra="ignore")


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- requests ---------------------------------------------------------------------------------------
class FunctionCall(_Request):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def for_template(self) -> dict:
        """The message as chat templates expect it (transformers' shape: tool-call arguments as a dict)."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message: dict = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            calls = []
            for call in self.tool_calls:
                try:
                    arguments = json.loads(call.function.arguments)
                except ValueError:
                    arguments = call.function.arguments
                calls.append({"id": call.id, "type": "function",
                              "function": {"name": call.function.name, "arguments": arguments}})
            message["tool_calls"] = calls
        return message


class FunctionDefinition(_Request):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ToolChoiceFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: ToolChoiceFunction


class StreamOptions(_Request):
    include_usage: bool = False


class JsonSchemaFormat(_Request):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")  # "schema" would shadow a pydantic attribute
    strict: bool | None = None  # accepted; the schema is always enforced (the answer cannot leave it)


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    def generation_options(self) -> dict:
        """GenerationConfig's structured-output option for this format (none for text)."""
        if self.type == "json_object":
            return {"json_object": True}
        if self.type == "json_schema":
            return {"json_schema": self.json_schema.schema_ if self.json_schema and self.json_schema.schema_ else {}}
        return {}


class SamplingRequest(_Request):
    """Fields chat and text completions share. A field left out takes the package's generation default."""

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="only one choice per request")
    user: str | None = None
    # Not OpenAI's, accepted by llama.cpp's and vLLM's servers too.
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)

    def generation_options(self) -> dict:
        """Keyword options for Model.stream (GenerationConfig's names); None means the package default."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        options = {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens,
                   "stop": tuple(stop) if stop else None, "seed": self.seed,
                   "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                   "top_k": self.top_k, "min_p": self.min_p, "repetition_penalty": self.repetition_penalty}
        return {k: v for k, v in options.items() if v is not None}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    def generation_options(self) -> dict:
        options = super().generation_options()
        if self.max_completion_tokens is not None:  # the newer name wins, as in OpenAI's API
            options["max_tokens"] = self.max_completion_tokens
        if self.logprobs:
            options.update(logprobs=True, top_logprobs=self.top_logprobs or 0)
        if self.response_format is not None:
            options.update(self.response_format.generation_options())
        return options

    @property
    def tool_choice_name(self) -> str | None:
        """tool_choice as Model.stream takes it: "auto", "none", "required" or the named tool."""
        choice = self.tool_choice
        return choice.function.name if isinstance(choice, NamedToolChoice) else choice

    def template_messages(self) -> list[dict]:
        return [m.for_template() for m in self.messages]


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] = Field(description="one prompt; a list must hold exactly one")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None  # refused: fill-in-the-middle needs a model trained for it

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def generation_options(self) -> dict:
        options = super().generation_options()
        if self.logprobs is not None:  # the legacy API's logprobs is the number of alternatives
            options.update(logprobs=True, top_logprobs=self.logprobs)
        return options


# -- responses --------------------------------------------------------------------------------------
class PromptTokensDetails(_Response):
    cached_tokens: int = 0


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(_Response):
    content: list[TokenLogprob] | None = None


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_Response):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(_Response):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Response):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(_Response):
    index: int = 0
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(_Response):
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []


class CompletionChoice(_Response):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "onnxllm"


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorBody


# -- embeddings (POST /v1/embeddings) ---------------------------------------------------------------
class EmbeddingRequest(_Request):
    model: str
    input: str | list[str] | list[int] | list[list[int]]  # token-id inputs are refused by the route
    encoding_format: Literal["float", "base64"] = "float"  # the openai client asks for base64 by default
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    # Not OpenAI's (ollama's /api/embed has it): False refuses texts over the model's limit instead of cutting.
    truncate: bool = True


class EmbeddingData(_Response):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # floats, or base64 of little-endian float32


class EmbeddingUsage(_Response):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(_Response):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage
    truncated: list[int] | None = None  # not OpenAI's: indices of inputs cut to the model's limit
