"""Building the peers' models (`compare.py --build NAME`), each in the venv that has the tools for it."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from .common import MODELS


# ---------------------------------------------------------------------------- building the models
def build_hf_checkpoint(out: Path, gguf: Path, tokenizer_from: Path) -> None:
    """(genai venv, transformers 5.x) dequantize the GGUF into a safetensors HF checkpoint."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # The GGUF says llama.rope.freq_base = 100000 (transformers 4.57 reads 10000); write both spellings.
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict):
        rope["rope_theta"] = 100000.0
    config.rope_theta = 100000.0
    try:
        loaded.save_pretrained(tmp, safe_serialization=True)
    except Exception as exc:  # noqa: BLE001 - transformers 5.x refuses to save a GGUF-loaded model: rebuild and copy
        print(f"save_pretrained refused ({type(exc).__name__}: {exc}); rebuilding from the config", flush=True)
        shutil.rmtree(tmp, ignore_errors=True)
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
        if [m for m in missing if "lm_head" not in m] or unexpected:
            raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
        fresh.tie_weights()
        fresh.save_pretrained(tmp, safe_serialization=True)
    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rope_theta"] = 100000.0
    if isinstance(cfg.get("rope_parameters"), dict):
        cfg["rope_parameters"]["rope_theta"] = 100000.0
    cfg.setdefault("torch_dtype", "float32")
    # The weights are plain float32 now; a leftover {"quant_method": "gguf"} makes onnxruntime-genai's builder
    # refuse the checkpoint ("The gguf quantized model is not currently supported").
    cfg.pop("quantization_config", None)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "generation_config.json"):
        if (tokenizer_from / name).exists():
            shutil.copy2(tokenizer_from / name, tmp / name)
    AutoConfig.from_pretrained(tmp)  # readable
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def build_genai(hf: Path, out: Path, precision: str, threads: int) -> None:
    """(genai venv) onnxruntime-genai's model builder, then pin the thread count in genai_config.json."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cache = MODELS / "genai-builder-cache"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp), "-p", precision,
           "-e", "cpu", "-c", str(cache)]
    if precision in ("int4", "int8"):  # the CPU defaults, spelled out: blocks of 32, int8 activations
        cmd += ["--extra_options", "block_size=32", "accuracy_level=4"]
    print("$", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    cfg_path = tmp / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    so = cfg["model"]["decoder"].setdefault("session_options", {})
    so["intra_op_num_threads"] = threads
    so["inter_op_num_threads"] = 1
    cfg_path.write_text(json.dumps(cfg, indent=4))
    (tmp / "BUILD_COMMAND.txt").write_text(shlex.join(cmd) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def build_optimum(hf: Path, out: Path) -> None:
    """(optimum venv) export fp32 with optimum, then a dynamic int8 (per-tensor, AVX512-VNNI config) copy."""
    from optimum.onnxruntime import ORTModelForCausalLM, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = ORTModelForCausalLM.from_pretrained(str(hf), export=True, use_cache=True)
    model.save_pretrained(tmp)
    quantizer = ORTQuantizer.from_pretrained(tmp, file_name="model.onnx")
    qconfig = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False)
    quantizer.quantize(save_dir=tmp, quantization_config=qconfig)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (hf / name).exists():
            shutil.copy2(hf / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def build_llamacpp_quant(src: Path, out: Path, qtype: str) -> None:
    """(llamacpp venv) requantize the GGUF with llama.cpp's own llama_model_quantize."""
    import ctypes

    import llama_cpp

    ftype = {"Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
             "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
             "Q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1}[qtype]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = 2
    tmp = out.with_name(out.name + ".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")
    tmp.rename(out)


def build_main(a) -> None:
    if a.build == "hf":
        build_hf_checkpoint(Path(a.out), Path(a.src), Path(a.tokenizer_from))
    elif a.build.startswith("genai-"):
        build_genai(Path(a.src), Path(a.out), a.build.split("-", 1)[1], a.threads)
    elif a.build == "optimum":
        build_optimum(Path(a.src), Path(a.out))
    elif a.build.startswith("llamacpp-"):
        build_llamacpp_quant(Path(a.src), Path(a.out), a.build.split("-", 1)[1])
    else:
        raise SystemExit(f"unknown build {a.build}")
