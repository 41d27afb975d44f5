"""Folders other tools make run as they are: onnxruntime-genai's builder, optimum, transformers.js.

Each folder is made here from a tiny random checkpoint by the tool itself (genai's builder) or faithfully to
its layout (tests/_foreign.py: torch.onnx export with optimum's names, transformers.js' variants). Greedy
tokens are compared with the tool's own runtime (og.Model), a plain onnxruntime loop, and transformers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _foreign import make_hf_onnx_folder
from _helpers import IDS, TOLERANCE, cli, logits, rel_rms
from _tiny import make_tiny_checkpoint

import onnxllm
from onnxllm.errors import InvalidPackageError

pytest.importorskip("transformers")
PROMPT = "the theory of everything is"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    base = tmp_path_factory.mktemp("ckpts")
    return {t: make_tiny_checkpoint(base, t) for t in ("llama", "qwen2")}


def _genai_build(ckpt: Path, out: Path, precision: str) -> Path:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o", str(out), "-p", precision,
           "-e", "cpu", "-c", str(out.parent / "hf-cache")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def genai_folders(ckpts, tmp_path_factory):
    pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("onnx_ir")
    base = tmp_path_factory.mktemp("genai")
    made = {}

    def get(model_type: str, precision: str) -> Path:
        key = (model_type, precision)
        if key not in made:
            made[key] = _genai_build(ckpts[model_type], base / f"{model_type}-{precision}", precision)
        return made[key]

    return get


@pytest.fixture(scope="module")
def tjs(ckpts, tmp_path_factory):
    """transformers.js layout: onnx/model.onnx, model_fp16.onnx (float16 I/O), model_q4.onnx (MatMulNBits)."""
    return make_hf_onnx_folder(tmp_path_factory.mktemp("tjs"), ckpts["llama"])


def _og_greedy(folder: Path, ids: list[int], n: int) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + n)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    out = []
    while not generator.is_done() and len(out) < n:
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


def _ort_greedy(onnx_path: Path, ids: list[int], n: int, *, layers: int) -> list[int]:
    """A plain onnxruntime loop with the names optimum and transformers.js use: concatenated past in, present out."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in sess.get_inputs()}
    dtype = np.float16 if inputs["past_key_values.0.key"].type == "tensor(float16)" else np.float32
    heads, dim = inputs["past_key_values.0.key"].shape[1], inputs["past_key_values.0.key"].shape[3]
    past = {f"past_key_values.{i}.{k}": np.zeros((1, heads, 0, dim), dtype) for i in range(layers)
            for k in ("key", "value")}
    names = [o.name for o in sess.get_outputs()]
    fed, out, step = [], [], list(ids)
    for _ in range(n):
        start = len(fed)
        feed = {"input_ids": np.array([step]), "attention_mask": np.ones((1, start + len(step)), np.int64), **past}
        if "position_ids" in inputs:
            feed["position_ids"] = np.arange(start, start + len(step))[None]
        result = dict(zip(names, sess.run(names, feed)))
        fed += step
        past = {f"past_key_values.{i}.{k}": result[f"present.{i}.{k}"] for i in range(layers) for k in ("key", "value")}
        token = int(result["logits"][0, -1].astype(np.float32).argmax())
        out.append(token)
        step = [token]
    return out


def _hf_greedy(ckpt: Path, ids: list[int], n: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# -- onnxruntime-genai's builder -------------------------------------------------------------------
@pytest.mark.parametrize("model_type,precision", [("llama", "fp32"), ("llama", "int4"), ("qwen2", "fp32"),
                                                  ("qwen2", "int4")])
def test_genai_builder_folder_gives_og_greedy_tokens(genai_folders, model_type, precision):
    folder = genai_folders(model_type, precision)
    before = _tree(folder)
    m = onnxllm.load(folder)
    ids = m.encode(PROMPT)
    theirs = _og_greedy(folder, ids, 20)
    assert m.generate(PROMPT, max_tokens=20, draft_tokens=0).token_ids == theirs
    assert m.generate(PROMPT, max_tokens=20).token_ids == theirs  # drafts on: GQA shares its buffer, free rewind
    assert m.session.can_verify and onnxllm.load(folder / "model.onnx").variant == m.variant
    variant = m.manifest.variants[m.variant]
    assert variant.scheme == precision  # read from MatMulNBits, not from the folder's name
    if precision == "int4":
        assert variant.method["quantization"]["MatMulNBits"]["bits"] == [4]
    assert _tree(folder) == before  # read only


def test_genai_folder_from_the_cli(genai_folders):
    folder = genai_folders("llama", "int4")
    info = cli("info", folder)
    assert info.returncode == 0 and "genai" in info.stdout and "MatMulNBits 4-bit block 32" in info.stdout
    run = cli("run", folder / "model.onnx", PROMPT, "--max-tokens", "6", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["tokens"] == _og_greedy(folder, onnxllm.load(folder).encode(PROMPT), 6)


# -- transformers.js and optimum layouts -----------------------------------------------------------
def test_transformers_js_folder_variants_equal_plain_ort_and_transformers(tjs, ckpts):
    m = onnxllm.load(tjs)
    assert sorted(m.manifest.variants) == ["fp16", "fp32", "q4"] and m.variant == "fp32"
    v = m.manifest.variants
    assert (v["fp32"].scheme, v["fp16"].scheme, v["q4"].scheme) == ("fp32", "fp16", "int4")
    assert v["fp16"].dtype == "float16" and v["q4"].method["quantization"]["MatMulNBits"]["block_size"] == [32]
    ids = m.encode(PROMPT)
    layers = m.manifest.architecture.num_layers
    for name in ("fp32", "fp16", "q4"):
        ours = onnxllm.load(tjs, variant=name).generate(PROMPT, max_tokens=16).token_ids
        assert ours == _ort_greedy(tjs / v[name].file, ids, 16, layers=layers), name
    assert m.generate(PROMPT, max_tokens=16).token_ids == _hf_greedy(ckpts["llama"], ids, 16)
    # the concatenating cache takes no drafts (said under -v), and prefix reuse across calls still holds
    assert not m.session.can_verify and any("drafts are off" in n for n in m.notes)
    again = m.generate(PROMPT, max_tokens=16)
    assert again.timings.cached_tokens > 0 and again.token_ids == m.generate(PROMPT, max_tokens=16).token_ids


def test_transformers_js_folder_from_the_cli(tjs):
    info = cli("info", tjs)
    assert info.returncode == 0, info.stderr
    assert "transformers.js" in info.stdout and "onnx/model_q4.onnx" in info.stdout
    assert "MatMulNBits 4-bit block 32" in info.stdout and "float16 tensors" in info.stdout
    run = cli("run", tjs / "onnx" / "model_fp16.onnx", PROMPT, "--max-tokens", "4", "--raw", "-v")
    assert run.returncode == 0 and "'fp16'" in run.stderr and "drafts are off" in run.stderr, run.stderr
    picked = cli("run", tjs, PROMPT, "--variant", "q4", "--max-tokens", "4", "--json")
    assert json.loads(picked.stdout)["variant"] == "q4"


def test_merged_decoder_with_use_cache_branch(ckpts, tmp_path):
    folder = make_hf_onnx_folder(tmp_path, ckpts["qwen2"], layout="optimum", merged=True)
    m = onnxllm.load(folder)
    assert m.variant == "decoder_model_merged"
    assert m.session.io.names.use_cache_branch == "use_cache_branch"
    ids = m.encode(PROMPT)
    assert m.generate(PROMPT, max_tokens=12).token_ids == _hf_greedy(ckpts["qwen2"], ids, 12)
    info = cli("info", folder)
    assert "skipped decoder_model.onnx" in info.stdout and "no past key/values" in info.stdout


def test_graph_without_position_ids(ckpts, tmp_path):
    folder = make_hf_onnx_folder(tmp_path, ckpts["llama"], layout="optimum", position_ids=False, variants=False)
    m = onnxllm.load(folder)
    assert m.session.io.names.position_ids is None and m.manifest.format == "optimum"
    ids = m.encode(PROMPT)
    assert m.generate(PROMPT, max_tokens=12).token_ids == _hf_greedy(ckpts["llama"], ids, 12)


def test_import_writes_a_package_that_quantize_and_eval_use(tjs, tmp_path):
    before = _tree(tjs)
    done = cli("import", tjs, "-o", tmp_path / "pkg")
    assert done.returncode == 0, done.stderr
    pkg = tmp_path / "pkg"
    manifest = json.loads((pkg / "onnxllm.json").read_text())
    assert manifest["source"]["imported_from"] == "transformers.js" and set(manifest["variants"]) == {
        "fp32",
        "fp16",
        "q4",
    }
    assert onnxllm.load(pkg, variant="q4").generate(PROMPT, max_tokens=8).token_ids == \
        onnxllm.load(tjs, variant="q4").generate(PROMPT, max_tokens=8).token_ids
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 8)
    quant = cli("quantize", pkg, "--scheme", "int8", "--no-eval")
    assert quant.returncode == 0, quant.stderr
    assert onnxllm.load(pkg, variant="int8").generate(PROMPT, max_tokens=4).token_ids
    ev = cli("eval", pkg, "--variant", "q4", "--text", text, "--tokens", "40")
    assert ev.returncode == 0 and "q4 against fp32" in ev.stdout, ev.stderr
    assert _tree(tjs) == before  # the original is never modified (its files are linked, not moved)
    again = cli("import", tjs, "-o", pkg)
    assert again.returncode == 1 and "--force" in again.stderr


# -- bad input: one line each ------------------------------------------------------------------
def _graph(path: Path, inputs: list[tuple[str, int, list]], outputs: list[tuple[str, int, list]]) -> Path:
    import onnx
    from onnx import helper

    nodes = [helper.make_node("Identity", [inputs[0][0]], [o[0]]) for o in outputs]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(*o) for o in outputs])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _bad_folders(tjs: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    from onnx import TensorProto

    out = {}
    enc = tmp / "encoder"
    shutil.copytree(tjs, enc, ignore=shutil.ignore_patterns("model_*.onnx"))
    _graph(enc / "onnx" / "model.onnx", [("input_ids", TensorProto.INT64, [1, 4])],
           [("last_hidden_state", TensorProto.INT64, [1, 4])])
    out["encoder"] = (enc, "no 'logits' output")
    vision = tmp / "vision"
    shutil.copytree(tjs, vision, ignore=shutil.ignore_patterns("model_*.onnx"))
    _graph(vision / "onnx" / "model.onnx", [("pixel_values", TensorProto.FLOAT, [1, 3])],
           [("logits", TensorProto.FLOAT, [1, 3])])
    out["vision tower"] = (vision, "takes no input_ids")
    extra = tmp / "extra-input"
    shutil.copytree(tjs, extra, ignore=shutil.ignore_patterns("model_*.onnx"))
    ins = [("input_ids", TensorProto.INT64, [1, 4]), ("attention_mask", TensorProto.INT64, [1, 4]),
           ("inputs_embeds", TensorProto.FLOAT, [1, 4]), ("past_key_values.0.key", TensorProto.FLOAT, [1, 2, 0, 16]),
           ("past_key_values.0.value", TensorProto.FLOAT, [1, 2, 0, 16])]
    outs = [("logits", TensorProto.INT64, [1, 4]), ("present.0.key", TensorProto.INT64, [1, 4]),
            ("present.0.value", TensorProto.INT64, [1, 4])]
    _graph(extra / "onnx" / "model.onnx", ins, outs)
    out["an input it cannot feed"] = (extra, "cannot feed: inputs_embeds")
    notok = tmp / "no-tokenizer"
    shutil.copytree(tjs, notok)
    (notok / "tokenizer.json").unlink()
    out["missing tokenizer"] = (notok, "no tokenizer.json")
    return out


def test_each_bad_folder_is_one_line(tjs, genai_folders, tmp_path):
    cases = _bad_folders(tjs, tmp_path)
    outside = tmp_path / "outside"
    shutil.copytree(genai_folders("llama", "fp32"), outside)
    config = json.loads((outside / "genai_config.json").read_text())
    config["model"]["decoder"]["filename"] = "../elsewhere/model.onnx"
    (outside / "genai_config.json").write_text(json.dumps(config))
    cases["genai_config naming a file outside"] = (outside, "outside")
    nodata = tmp_path / "no-data"
    shutil.copytree(genai_folders("llama", "fp32"), nodata)
    (nodata / "model.onnx.data").unlink()
    cases["external data missing"] = (nodata, "model.onnx.data, which is missing")
    for what, (folder, message) in cases.items():
        with pytest.raises(InvalidPackageError, match=message):
            onnxllm.load(folder)
        run = cli("run", folder, "hi", "--max-tokens", "2")
        assert run.returncode == 1 and message in run.stderr, (what, run.stderr)
        assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, (what, run.stderr)


# -- the real tier --------------------------------------------------------------------------------
@pytest.mark.real
def test_smollm2_through_the_genai_builder_int4(smollm2_package, tmp_path, reference):
    """SmolLM2 (HF folder rebuilt from the GGUF) through genai's builder at int4: onnxllm = og.Model, greedy."""
    pytest.importorskip("onnxruntime_genai")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import smollm2_gguf

    gguf = smollm2_gguf()
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ours = json.loads((smollm2_package / "onnxllm.json").read_text())
    config.eos_token_id, config.bos_token_id = ours["eos_token_ids"][0], ours["bos_token_id"]
    rebuilt = AutoModelForCausalLM.from_config(config)  # transformers 5 refuses save_pretrained on a GGUF load
    rebuilt.load_state_dict(loaded.state_dict())
    ckpt = tmp_path / "smollm2-hf"
    rebuilt.save_pretrained(str(ckpt))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smollm2_package / f).is_file():
            shutil.copy(smollm2_package / f, ckpt / f)
    del loaded, rebuilt
    torch.set_num_threads(os.cpu_count() or 1)
    folder = _genai_build(ckpt, tmp_path / "genai-int4", "int4")
    m = onnxllm.load(folder)
    for case in reference["greedy_fp32"]:
        ids = m.encode(case["prompt"])
        # one token per pass, as og.Model decodes: an int4 pass over several drafted tokens rounds differently
        assert m.generate(case["prompt"], max_tokens=16, draft_tokens=0).token_ids == _og_greedy(folder, ids, 16)


def test_hard_linked_weights_quantize(package, tmp_path):
    """`onnxllm import` hard-links another tool's files; onnx refuses to load a data file with two links,
    so quantize reads the weights itself, and the linked original is left as it was."""
    pkg = package("llama")
    data = pkg / "onnx" / "model.onnx.data"
    assert data.is_file()
    outside = tmp_path / "original.data"
    outside.hardlink_to(data)
    before = hashlib.sha256(outside.read_bytes()).hexdigest()
    plain = logits(pkg, "fp32", IDS)
    onnxllm.quantize(pkg, "int8", evaluate=False)
    assert rel_rms(logits(pkg, "int8", IDS), plain) < TOLERANCE["int8"]
    assert hashlib.sha256(outside.read_bytes()).hexdigest() == before and data.stat().st_nlink == 2
