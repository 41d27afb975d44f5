"""Weight-only quantization of exported packages (int8, int4), and how far a variant is from fp32."""

from .quality import QualityReport, evaluate
from .quantize import QuantizeResult, quantize
from .schemes import SCHEMES, Scheme

__all__ = ["QualityReport", "QuantizeResult", "SCHEMES", "Scheme", "evaluate", "quantize"]
