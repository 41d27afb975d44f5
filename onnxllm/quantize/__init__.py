"""Weight-only quantization of exported packages (int8, int4), and how far a variant is from fp32."""

from .quality import QualityReport, decode_speed, evaluate, format_report
from .quantize import QuantizeResult, quantize
from .schemes import SCHEMES, Scheme

__all__ = ["SCHEMES", "QualityReport", "QuantizeResult", "Scheme", "decode_speed", "evaluate", "format_report", "quantize"]
