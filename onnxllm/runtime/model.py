"""A loaded package: `load_package()` makes a Model (onnxllm.load wraps it), then `generate`, `stream` or `chat`.

A Model serializes its own use: two threads calling it at once take turns (never mix their KV
cache). Every call reuses the cached prefix of the previous one, so a chat turn prefills only
its new tokens.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from ..errors import ContextOverflowError, DeviceError, GenerationError, InvalidPackageError
from ..package import Manifest, safe_path
from ..readers import open_folder
from .chat_template import ChatTemplate, ChatVariables
from .constraints import Constraint, ConstraintCompiler, tool_call_grammar
from .generate import Chunk, GenerationConfig, GenerationResult, generate_tokens, stream_text
from .options import GenerationOptions
from .providers import ProviderChoice, select_providers, session_options
from .session import DecoderSession, SessionConfig, open_session
from .tokenizer import _token_text, load_tokenizer  # noqa: F401 (quantize/embedding imports it here)
from .tool_calls import ToolCallFormat, check_tools, filter_tool_calls, format_for_template

if TYPE_CHECKING:
    from typing_extensions import Unpack

Messages = list[dict]


@dataclass(frozen=True)
class LoadOptions:
    device: str = "auto"
    variant: str | None = None
    threads: int | None = None
    context: int | None = None
    optimization: str = "all"
    kv_mode: str = "shared"
    io_binding: bool = True
    prefill_chunk: int = SessionConfig.prefill_chunk  # tokens per prefill pass (0: the whole prompt in one)


def _check_text(text: str) -> str:
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GenerationError(f"the prompt is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not isinstance(text, str):
        raise GenerationError(f"the prompt must be a string, got {type(text).__name__}")
    if "\x00" in text:
        raise GenerationError("the prompt contains a NUL character; remove it")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise GenerationError(
            "the prompt contains invalid Unicode (a lone surrogate); it cannot be encoded as UTF-8") from None
    return text


class Model:
    """A loaded package: tokenizer, chat template, one decoder session."""

    def __init__(self, root: Path, manifest: Manifest, variant: str, session: DecoderSession, tokenizer,
                 template: ChatTemplate | None, choice: ProviderChoice):
        self.root = root
        self.manifest = manifest
        self.variant = variant
        self.session = session
        self.tokenizer = tokenizer
        self.template = template
        self.placement = choice  # the device, the ORT providers given to the session, why not a better one
        self.notes: list[str] = []  # how the folder was read and what is off for its graph (shown under -v)
        # How this model writes tool calls, read from its chat template (None: the template takes no tools).
        self.tool_format = format_for_template(template.source if template is not None else None)
        self.defaults = GenerationConfig().updated(**{
            k: v for k, v in {"max_tokens": manifest.generation.get("max_new_tokens"),
                              "temperature": manifest.generation.get("temperature"),
                              "top_k": manifest.generation.get("top_k"),
                              "top_p": manifest.generation.get("top_p"),
                              "repetition_penalty": manifest.generation.get("repetition_penalty")}.items()
            if v is not None})
        # Serializes use across threads. Re-entrant, so a thread that abandoned a stream (a `break`
        # with the iterator still referenced) can start a new call; the epoch then retires the old
        # stream, which ends as "cancelled" if resumed instead of touching the session again.
        self._lock = threading.RLock()
        self._epoch = 0
        self._malloc_trim = _find_malloc_trim()
        self._constraints: ConstraintCompiler | None = None  # built on the first constrained call

    def _compiler(self) -> ConstraintCompiler:
        with self._lock:
            if self._constraints is None:
                self._constraints = ConstraintCompiler(self.tokenizer, n_vocab=self.manifest.architecture.vocab_size,
                                                       eos_ids=self.manifest.eos_token_ids)
            return self._constraints

    def constraint(self, config: GenerationConfig) -> Constraint | None:
        """The config's JSON schema, regex or grammar compiled for this model's tokenizer (None: unconstrained)."""
        spec = config.constraint()
        return None if spec is None else self._compiler().compile(spec)

    # -- prompts -> token ids ------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(_check_text(text), add_special_tokens=False).ids
        if self.manifest.add_bos_token and self.manifest.bos_token_id is not None:
            ids = [self.manifest.bos_token_id, *ids]
        return ids

    def render(self, messages: Messages, *, add_generation_prompt: bool = True,
               variables: ChatVariables = ChatVariables()) -> str:
        """The chat template applied to `messages`; `variables` carries tools and switches like enable_thinking."""
        if self.template is None:
            raise GenerationError(f"this model ({self.root.name}) has no chat template; pass a plain prompt (--raw)")
        for m in messages:
            if isinstance(m, dict) and isinstance(m.get("content"), str):
                _check_text(m["content"])
        return self.template.render(messages, add_generation_prompt=add_generation_prompt, **variables.as_dict())

    def tool_call_format(self, tools: list[dict] | None) -> ToolCallFormat | None:
        """The format to parse calls to `tools` in; a clear error when this model's template takes no tools."""
        if not tools:
            return None
        if self.tool_format is None:
            raise GenerationError(f"tools cannot be used with this model ({self.root.name}): its chat template does "
                                  "not take them in a known format (Hermes <tool_call>, Llama 3 JSON, Mistral "
                                  "[TOOL_CALLS]); leave tools out")
        return self.tool_format

    def prompt_ids(self, prompt: str | Messages, *, chat: bool = False, system: str | None = None,
                   tools: list[dict] | None = None) -> list[int]:
        if isinstance(prompt, list):
            return self.encode_chat(prompt, variables=ChatVariables(tools=tools))
        if tools and not chat:
            raise GenerationError("tools need a chat: pass a list of messages (or chat=True)")
        text = _check_text(prompt)
        if not text:
            raise GenerationError("the prompt is empty; give some text")
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
            return self.encode_chat(messages, variables=ChatVariables(tools=tools))
        return self.encode(text)

    def encode_chat(self, messages: Messages, *, variables: ChatVariables = ChatVariables()) -> list[int]:
        # Templates write their own BOS/special tokens as text; the tokenizer maps them to ids.
        return self.tokenizer.encode(self.render(messages, variables=variables), add_special_tokens=False).ids

    # -- generation ----------------------------------------------------------------------------
    def config(self, config: GenerationConfig | None = None, /,
               **overrides: Unpack[GenerationOptions]) -> GenerationConfig:
        """`config` (default: the package's defaults) with `overrides` applied, validated."""
        config = (self.defaults if config is None else config).updated(**overrides).validate()
        spec = config.constraint()
        if spec is not None:
            self._compiler().grammar(spec)  # a bad schema, regex or grammar fails here, before any generation
        return config

    def stream_ids(self, ids: Sequence[int], config: GenerationConfig, *, cancel: threading.Event | None = None,
                   clip: bool = False) -> Iterator[Chunk]:
        """Stream from token ids (the layer chat and prompt-level calls share).

        clip: max_tokens came from the defaults, not the caller, so shrink it to what the context
        leaves instead of failing (an explicit max_tokens that does not fit is an error).
        """
        with self._lock:
            self._epoch += 1
            stop = _Retired(self, self._epoch, cancel)
            room = self.session.context - len(ids)
            if clip and 0 < room < config.max_tokens:
                config = replace(config, max_tokens=room)
            total = len(ids) + config.max_tokens
            if total > self.session.context:
                raise ContextOverflowError(
                    f"prompt ({len(ids)} tokens) + max_tokens ({config.max_tokens}) = {total} exceeds the context "
                    f"of {self.session.context} tokens; shorten the prompt or lower max_tokens"
                )
            events = generate_tokens(self.session, ids, config, eos_ids=self.manifest.eos_token_ids, cancel=stop,
                                     constraint=self.constraint(config))
            try:
                yield from stream_text(events, self.tokenizer, config)
            finally:
                self._release_memory()

    def _release_memory(self) -> None:
        """Give a finished call's freed buffers back to the OS (glibc keeps freed heap memory otherwise,
        and a desktop app's RSS would creep up by the largest prefill's buffers). Once per call, not
        per token; a no-op where malloc_trim does not exist."""
        if self._malloc_trim is not None:
            self._malloc_trim(0)

    def stream(self, prompt: str | Messages, config: GenerationConfig | None = None, *,
               cancel: threading.Event | None = None, chat: bool = False, system: str | None = None,
               tools: list[dict] | None = None, tool_choice: str | None = None,
               **overrides: Unpack[GenerationOptions]) -> Iterator[Chunk]:
        """Yield Chunks as they are generated; the last one carries finish_reason and timings.

        `config` replaces the package's defaults (GenerationConfig); `overrides` change single fields.
        Breaking out of the loop, or setting `cancel` from another thread, stops generation within
        one token; the model stays ready for the next call. `tools` (OpenAI-shaped function
        definitions) go to the chat template; the model's calls come out on `Chunk.tool_calls`, not in
        the text. `tool_choice`: "auto" (the default), "none" (tools not offered), "required" (one call
        to one of them) or a tool's name (one call to it); a forced call's arguments follow the tool's
        parameters schema (structured output, onnxllm[structured]).
        """
        tools = check_tools(tools) if tool_choice != "none" else None
        fmt = self.tool_call_format(tools)
        if tool_choice not in (None, "auto", "none"):
            overrides = {**overrides, "grammar": _forced_call(fmt, tools, tool_choice)}
        resolved = self.config(config, **overrides)
        ids = self.prompt_ids(prompt, chat=chat, system=system, tools=tools)
        chunks = self.stream_ids(ids, resolved, cancel=cancel, clip=_default_max_tokens(config, overrides))
        return chunks if fmt is None else filter_tool_calls(chunks, fmt, _tool_names(tools))

    def generate(self, prompt: str | Messages, config: GenerationConfig | None = None, *,
                 cancel: threading.Event | None = None, chat: bool = False, system: str | None = None,
                 tools: list[dict] | None = None, tool_choice: str | None = None,
                 **overrides: Unpack[GenerationOptions]) -> GenerationResult:
        """The whole answer: text, token ids, finish reason (stop, length, eos, cancelled), timings, tool calls."""
        return collect(self.stream(prompt, config, cancel=cancel, chat=chat, system=system, tools=tools,
                                   tool_choice=tool_choice, **overrides))

    def chat(self, system: str | None = None, config: GenerationConfig | None = None, *,
             tools: list[dict] | None = None, **overrides: Unpack[GenerationOptions]) -> "Chat":
        """A conversation whose turns use `config` and `overrides` unless a turn gives its own."""
        return Chat(self, system=system, config=config, tools=tools, **overrides)

    def embed(self, texts, *, batch_size: int = 32, normalize: bool | None = None, truncate: bool = True):
        """Refused: a text-generation package has no embedding mode (see runtime/embed.py)."""
        from .embed import no_embedding_mode

        raise no_embedding_mode(self.root)

    @property
    def execution_providers(self) -> list[str]:
        """The providers ONNX Runtime runs this model with, in priority order (CPU last)."""
        return self.session.session.get_providers()

    def info(self) -> dict:
        from .info import package_info

        return package_info(self.root, self.manifest, providers=self.placement)


def _default_max_tokens(config: GenerationConfig | None, overrides: GenerationOptions) -> bool:
    """Whether max_tokens came from the package's defaults rather than the caller (then it is clipped to the
    room the context leaves instead of failing)."""
    return config is None and overrides.get("max_tokens") is None


def _find_malloc_trim():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


class _Retired:
    """The cancel signal of one stream: the caller's event, or a newer call having taken the model."""

    def __init__(self, model: Model, epoch: int, cancel: threading.Event | None):
        self.model, self.epoch, self.cancel = model, epoch, cancel

    def is_set(self) -> bool:
        return self.model._epoch != self.epoch or (self.cancel is not None and self.cancel.is_set())


def _tool_names(tools: list[dict]) -> list[str]:
    return [t["function"]["name"] for t in tools]


def _forced_call(fmt: ToolCallFormat | None, tools: list[dict] | None, choice) -> str:
    """The grammar of one call to the chosen tool(s), in the format this model's template teaches."""
    if not isinstance(choice, str):
        raise GenerationError(f"tool_choice must be 'auto', 'none', 'required' or a tool's name, got {choice!r}")
    if not tools or fmt is None:
        raise GenerationError(f"tool_choice {choice!r} needs tools; pass tools=[...] or leave tool_choice out")
    return tool_call_grammar(tools, start=fmt.start, end=fmt.end, arguments_key=fmt.arguments_keys[0],
                             name=None if choice == "required" else choice)


def collect(chunks: Iterator[Chunk]) -> GenerationResult:
    text, tokens, finish, timings, calls, logprobs = [], [], "length", None, [], []
    for chunk in chunks:
        text.append(chunk.text)
        calls.extend(chunk.tool_calls)
        if chunk.logprobs is not None:
            logprobs.append(chunk.logprobs)
        if chunk.token is not None:
            tokens.append(chunk.token)
        if chunk.finish_reason:
            finish, timings = chunk.finish_reason, chunk.timings
    return GenerationResult("".join(text), tokens, finish, timings, calls, logprobs)


class Chat:
    """A multi-turn conversation; the KV cache carries over, so each turn prefills only new tokens."""

    def __init__(self, model: Model, *, system: str | None = None, config: GenerationConfig | None = None,
                 tools: list[dict] | None = None, **overrides: Unpack[GenerationOptions]):
        if model.template is None:
            raise GenerationError("this model has no chat template; use model.generate() with a plain prompt")
        self.model = model
        self.system = system
        self.tools = check_tools(tools)
        self.tool_format = model.tool_call_format(self.tools)
        self.config = config
        self.options: GenerationOptions = overrides
        self.messages: Messages = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _fit(self, config: GenerationConfig, clip: bool) -> list[int]:
        """Token ids of the conversation; drops the oldest turns only when asked to (never silently)."""
        while True:
            ids = self.model.encode_chat(self.messages, variables=ChatVariables(tools=self.tools))
            if len(ids) + config.max_tokens <= self.model.session.context:
                return ids
            if clip and len(ids) < self.model.session.context - 16:
                return ids  # the default max_tokens will be clipped to the room left
            first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
            if config.context_overflow != "truncate" or len(self.messages) - first <= 1:
                raise ContextOverflowError(
                    f"the conversation ({len(ids)} tokens) + max_tokens ({config.max_tokens}) exceeds the context of "
                    f"{self.model.session.context} tokens; start a new chat (reset), lower max_tokens, or pass "
                    "context_overflow='truncate' to drop the oldest turns"
                )
            del self.messages[first:first + 2]  # the oldest user turn and its reply

    def send(self, text: str, config: GenerationConfig | None = None, *, cancel: threading.Event | None = None,
             **overrides: Unpack[GenerationOptions]) -> Iterator[Chunk]:
        """Stream the reply to `text`; the reply joins the history when the stream ends (or is cut).

        `config` and `overrides` apply to this turn, over the chat's own."""
        text = _check_text(text)
        if not text.strip():
            raise GenerationError("the message is empty; type something")
        yield from self._reply({"role": "user", "content": text}, cancel, config, overrides)

    def add_tool_result(self, call_id: str, content: str, *, name: str | None = None) -> None:
        """Give the model what a tool call returned (a `role: "tool"` message); then `respond()`."""
        message = {"role": "tool", "tool_call_id": call_id, "content": _check_text(content)}
        self.messages.append({**message, "name": name} if name else message)

    def respond(self, config: GenerationConfig | None = None, *, cancel: threading.Event | None = None,
                **overrides: Unpack[GenerationOptions]) -> Iterator[Chunk]:
        """Stream the assistant's next turn without a new user message (after tool results)."""
        yield from self._reply(None, cancel, config, overrides)

    def _reply(self, message: dict | None, cancel: threading.Event | None, config: GenerationConfig | None,
               overrides: GenerationOptions) -> Iterator[Chunk]:
        base = self.config if config is None else config
        merged: GenerationOptions = {**self.options, **overrides}
        clip = _default_max_tokens(base, merged)
        config = self.model.config(base, **merged)
        if message is not None:
            self.messages.append(message)
        try:
            ids = self._fit(config, clip)
        except Exception:
            if message is not None:
                self.messages.pop()
            raise
        yield from self._run(ids, config, cancel, clip)

    def _run(self, ids: list[int], config: GenerationConfig, cancel, clip: bool) -> Iterator[Chunk]:
        reply, calls = [], []
        chunks = self.model.stream_ids(ids, config, cancel=cancel, clip=clip)
        if self.tool_format is not None:
            chunks = filter_tool_calls(chunks, self.tool_format, _tool_names(self.tools))
        try:
            for chunk in chunks:
                reply.append(chunk.text)
                calls.extend(chunk.tool_calls)
                yield chunk
        finally:
            turn = {"role": "assistant", "content": "".join(reply)}
            if calls:
                turn["tool_calls"] = [c.as_message() for c in calls]
            self.messages.append(turn)

    def ask(self, text: str, config: GenerationConfig | None = None, *, cancel: threading.Event | None = None,
            **overrides: Unpack[GenerationOptions]) -> GenerationResult:
        """The whole reply to `text` (see send)."""
        return collect(self.send(text, config, cancel=cancel, **overrides))


def _pick_variant(manifest: Manifest, variant: str | None, device: str) -> str:
    if variant is not None:
        if variant not in manifest.variants:
            raise InvalidPackageError(
                f"variant {variant!r} is not in this package; it has: {', '.join(manifest.variants)} "
                f"(make one with `onnxllm quantize PACKAGE --scheme {variant}`)"
            )
        return variant
    return manifest.default_variant.get(device) or manifest.default_variant.get("cpu") or next(iter(manifest.variants))


def _fit_device(choice: ProviderChoice, manifest: Manifest, variant: str, asked: str) -> ProviderChoice:
    """ORT's CUDA GroupQueryAttention runs only float16/bfloat16: a float32 variant cannot use the GPU."""
    if choice.device != "cuda" or manifest.variants[variant].dtype != "float32" or manifest.kind == "embedding":
        return choice
    fix = "export a float16 package (onnxllm export SOURCE -o OUT --dtype float16) for the GPU"
    if asked == "cuda":
        raise DeviceError(
            f"variant {variant!r} computes in float32, which the CUDA attention kernel does not support; {fix}")
    cpu = [(n, o) for n, o in choice.providers if n == "CPUExecutionProvider"]
    return ProviderChoice("cpu", cpu, f"CUDA not used: variant {variant!r} is float32; {fix}")


def load_package(path: str | Path, options: LoadOptions = LoadOptions()) -> Model:
    if options.kv_mode not in ("shared", "growing"):
        raise GenerationError(f"kv_mode must be 'shared' or 'growing', got {options.kv_mode!r}")
    chunk = options.prefill_chunk
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        raise GenerationError(f"prefill_chunk must be an integer >= 0 (0: the whole prompt in one pass), got {chunk!r}")
    folder = open_folder(path)
    root, manifest = folder.root, folder.manifest
    choice = select_providers(options.device)
    name = _pick_variant(manifest, options.variant or folder.variant, choice.device)
    choice = _fit_device(choice, manifest, name, options.device)
    onnx_path = safe_path(root, manifest.variants[name].file)
    if not onnx_path.is_file():
        raise InvalidPackageError(f"{onnx_path} is missing; the package is incomplete: re-export it")
    tokenizer = load_tokenizer(root, manifest)
    if manifest.kind == "embedding":
        return _load_embedding(root, manifest, name, choice, tokenizer, options, onnx_path)
    template = _chat_template(root, manifest)
    sess_opts = session_options(threads=options.threads, optimization=options.optimization)
    session = open_session(onnx_path, manifest, providers=choice.providers, options=sess_opts,
                           config=SessionConfig(kv_mode=options.kv_mode, io_binding=options.io_binding,
                                                prefill_chunk=options.prefill_chunk),
                           context=options.context, variant=name)
    model = Model(root, manifest, name, session, tokenizer, template, choice)
    if folder.layout != "onnxllm":
        model.notes.append(f"read {root} ({folder.layout} layout): variant {name!r} "
                           f"({manifest.variants[name].scheme}, {manifest.variants[name].file})")
    if session.cache_note:
        model.notes.append(f"KV cache grows by concatenation: {session.cache_note}")
    if not session.can_verify:
        model.notes.append("prompt-lookup drafts are off: a growing cache cannot be rewound for free "
                           "(the answer is the same, one token per pass)")
    return model


def _chat_template(root: Path, manifest: Manifest) -> ChatTemplate | None:
    """The template from its file: .jinja holds the text, .json (tokenizer_config.json, chat_template.json) holds
    it under "chat_template" (a string, or a list of named templates, of which "default" is used)."""
    import json

    if not manifest.chat_template or not safe_path(root, manifest.chat_template).is_file():
        return None
    special = {"bos_token": None, "eos_token": None}
    config: dict = {}
    cfg_path = root / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
            special = {k: _token_text(config.get(k)) for k in special}
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    text = safe_path(root, manifest.chat_template).read_text(encoding="utf-8")
    if manifest.chat_template.endswith(".json"):
        try:
            value = json.loads(text).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            raise InvalidPackageError(f"{manifest.chat_template} is not valid JSON; re-download it") from None
        if isinstance(value, list):
            value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"),
                         None)
        if not isinstance(value, str):
            return None
        text = value
    return ChatTemplate(text, **special)


def _load_embedding(root: Path, manifest: Manifest, variant: str, choice: ProviderChoice, tokenizer,
                    options: LoadOptions, onnx_path: Path):
    """An embedding package: one plain session (no KV cache), see runtime/embed.py."""
    import onnxruntime as ort

    from .embed import EmbeddingModel, embedding_tokenizer

    sess_opts = session_options(threads=options.threads, optimization=options.optimization)
    # The arena the decoders turn off (for a flat RSS between long prefills) pays here: one pass per batch,
    # buffers reused; all-MiniLM-L6-v2 fp32 measured ~15% more texts/s with it, at batch 1 and 32.
    sess_opts.enable_cpu_mem_arena = True
    try:
        session = ort.InferenceSession(str(onnx_path), sess_options=sess_opts, providers=choice.providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types on a corrupt file
        raise InvalidPackageError(f"{onnx_path} cannot be loaded: {str(exc).splitlines()[0][:200]}") from None
    return EmbeddingModel(root, manifest, variant, session, embedding_tokenizer(tokenizer, manifest.embedding), choice)
