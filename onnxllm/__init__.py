"""onnxllm: run large language models offline, on your own machine, through ONNX Runtime."""

# The quantize subpackage is bound first: importing it later would rebind `onnxllm.quantize` (the function below)
# to the subpackage, as Python binds a submodule on its parent when it is first loaded.
from . import quantize as _quantize_package  # noqa: F401
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
