"""The names `import onnxllm` gives stay the API's functions, whatever is imported later."""

from __future__ import annotations

import subprocess
import sys


def test_quantize_stays_the_function_after_its_subpackage_is_imported():
    code = ("import onnxllm, onnxllm.api\n"
            "import onnxllm.quantize.quantize, onnxllm.quantize.quality\n"
            "assert onnxllm.quantize is onnxllm.api.quantize, type(onnxllm.quantize)\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_import_onnxllm_stays_light():
    code = ("import sys, onnxllm\n"
            "heavy = [m for m in ('torch', 'transformers', 'onnx', 'fastapi', 'llguidance') if m in sys.modules]\n"
            "print(','.join(heavy))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"import onnxllm pulled in {proc.stdout.strip()}"
