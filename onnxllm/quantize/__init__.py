"""Quantization of exported packages (int8, int4, int8-dynamic), and how far a variant is from its base."""

from .quality import QualityReport, decode_speed, evaluate, format_report, hamlet_text
from .quantize import QuantizeOptions, QuantizeResult, quantize
from .schemes import SCHEMES, Scheme

__all__ = ["SCHEMES", "QualityReport", "QuantizeOptions", "QuantizeResult", "Scheme", "decode_speed", "evaluate",
           "format_report", "hamlet_text", "quantize"]
