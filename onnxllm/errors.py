"""Typed errors. Each message says what was wrong and what to do; the CLI prints it in one line."""


class OnnxLLMError(Exception):
    """Base class of every error onnxllm raises on purpose."""


class ModelNotFoundError(OnnxLLMError):
    """A path, catalog name or hub id that does not lead to a model."""


class InvalidPackageError(OnnxLLMError):
    """A model package (manifest, .onnx, tokenizer) that is missing parts, corrupt or unsafe."""


class UnsupportedModelError(OnnxLLMError):
    """An architecture, GGUF type or option the exporter does not handle."""


class ExportError(OnnxLLMError):
    """Export failed (verification above tolerance, write error, ...)."""


class QuantizeError(OnnxLLMError):
    """Quantization failed or was asked for something invalid."""


class DeviceError(OnnxLLMError):
    """An execution provider that is unknown or not available here."""


class GenerationError(OnnxLLMError):
    """Bad generation options or input (prompt too long, empty, out-of-range sampling values)."""


class EmbeddingError(OnnxLLMError):
    """Bad embedding input (an empty text, a non-string, a text over the limit with truncate=False)."""


class ContextOverflowError(GenerationError):
    """Prompt plus max_tokens do not fit the context."""


class OfflineError(ModelNotFoundError):
    """A hub id was asked for but the network cannot be reached."""


class ConstraintError(GenerationError):
    """A JSON schema, regular expression or grammar that cannot be compiled or held to."""
