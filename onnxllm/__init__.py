"""onnxllm: run large language models offline, on your own machine, through ONNX Runtime."""

from .api import embed, export, generate, load, pull, quantize, search, stream
from .errors import (ConstraintError, ContextOverflowError, DeviceError, EmbeddingError, ExportError, GenerationError,
                     InvalidPackageError, ModelNotFoundError, OfflineError, OnnxLLMError, QuantizeError,
                     UnsupportedModelError)
from .runtime.chat_template import ChatVariables
from .runtime.embed import EmbeddingModel, Embeddings, SearchHit
from .runtime.generate import Chunk, GenerationConfig, GenerationResult
from .version import __version__

__all__ = ["load", "export", "quantize", "generate", "stream", "pull", "embed", "search", "GenerationConfig",
           "GenerationResult", "Chunk", "ChatVariables", "EmbeddingModel", "Embeddings", "SearchHit", "EmbeddingError",
           "OnnxLLMError", "ConstraintError", "ContextOverflowError", "DeviceError", "ExportError", "GenerationError",
           "InvalidPackageError", "ModelNotFoundError", "OfflineError", "QuantizeError", "UnsupportedModelError",
           "__version__"]
