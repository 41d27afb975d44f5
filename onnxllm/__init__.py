"""onnxllm: run large language models offline, on your own machine, through ONNX Runtime."""

__version__ = "0.1.0"

from .api import embed, export, generate, load, pull, quantize, search, stream  # noqa: E402
from .errors import (ConstraintError, ContextOverflowError, DeviceError, EmbeddingError, ExportError,  # noqa: E402
                     GenerationError, InvalidPackageError, ModelNotFoundError, OfflineError, OnnxLLMError, QuantizeError,
                     UnsupportedModelError)
from .runtime.chat_template import ChatVariables  # noqa: E402
from .runtime.embed import EmbeddingModel, Embeddings, SearchHit  # noqa: E402
from .runtime.generate import Chunk, GenerationConfig, GenerationResult  # noqa: E402

__all__ = ["load", "export", "quantize", "generate", "stream", "pull", "embed", "search", "GenerationConfig",
           "GenerationResult", "Chunk", "ChatVariables", "EmbeddingModel", "Embeddings", "SearchHit", "EmbeddingError",
           "OnnxLLMError", "ConstraintError", "ContextOverflowError", "DeviceError", "ExportError", "GenerationError",
           "InvalidPackageError", "ModelNotFoundError", "OfflineError", "QuantizeError", "UnsupportedModelError",
           "__version__"]
