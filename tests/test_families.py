"""Every model family with its features on: ONNX logits equal PyTorch's, greedy tokens equal transformers'
generate through the KV cache, int4 and int8-dynamic variants run; tokenizers and chat templates equal
transformers' per tokenizer kind.

Each family is a tiny random model made here from a transformers config that turns its features on: a
sliding window (4) shorter than the test sequence (24), LongRoPE with original_max_position_embeddings (16)
below it, soft-capping, a no-RoPE layer, multipliers away from 1.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _tiny import make_tiny_checkpoint

pytest.importorskip("transformers")

from onnxllm.decoder_io import DecoderIO  # noqa: E402
from onnxllm.errors import UnsupportedModelError  # noqa: E402
from onnxllm.exporter.export import ExportOptions, export  # noqa: E402
from onnxllm.package import read_manifest  # noqa: E402

WINDOW, SWITCH, LENGTH = 4, 16, 24


def _longrope(partial: float, head_dim: int = 32) -> dict:
    half = int(head_dim * partial) // 2
    return {"hidden_size": 128, "original_max_position_embeddings": SWITCH, "max_position_embeddings": 256,
            "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": partial,
                                "original_max_position_embeddings": SWITCH,
                                "short_factor": [1.0 + 0.25 * i for i in range(half)],
                                "long_factor": [2.0 + 2.0 * i for i in range(half)]}}


# id -> (model_type, config overrides, what the manifest's graph description must show)
FAMILIES = {
    "llama-rope-llama3": ("llama", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": SWITCH}}, {}),
    "llama-rope-linear": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0,
                                                        "factor": 2.0}}, {}),
    "llama-rope-yarn": ("llama", {"rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}}, {}),
    "llama-biases": ("llama", {"attention_bias": True, "mlp_bias": True}, {}),
    "mistral-window": ("mistral", {"sliding_window": WINDOW}, {"window": [WINDOW, WINDOW]}),
    "qwen2-window": ("qwen2", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
                     {"window": [-1, WINDOW]}),
    "qwen3": ("qwen3", {}, {"qk_norm": [True, True]}),
    "gemma2": ("gemma2", {"sliding_window": WINDOW, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0,
                          "query_pre_attn_scalar": 24}, {"window": [WINDOW, -1], "softcap": [5.0, 5.0]}),
    "gemma3": ("gemma3_text", {"sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"],
                               "query_pre_attn_scalar": 24, "rope_parameters": {
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                   "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}},
               {"window": [WINDOW, -1], "qk_norm": [True, True], "rope_table": [1, 0]}),
    # Phi-4-mini's 0.75 of head 128 is 96, fused; 0.75 of 32 is 24, which GroupQueryAttention cannot rotate.
    "phi3-longrope-partial-outside": ("phi3", _longrope(0.75), {"rotary": ["outside", "outside"]}),
    "phi3-longrope-partial-fused": ("phi3", _longrope(0.5), {"rotary": ["fused", "fused"]}),
    "smollm3-nope": ("smollm3", {"no_rope_layers": [1, 0]}, {"rotary": ["fused", "none"]}),
    "granite": ("granite", {"embedding_multiplier": 3.0, "residual_multiplier": 0.5, "attention_multiplier": 0.2,
                            "logits_scaling": 4.0}, {"scale": [0.2, 0.2]}),
    "olmo2": ("olmo2", {}, {"qk_norm": [True, True]}),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family id -> (checkpoint, package), each made once for this module."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in made:
            model_type, overrides, _ = FAMILIES[family]
            root = tmp_path_factory.mktemp(family)
            ckpt = make_tiny_checkpoint(root, model_type, **overrides)
            made[family] = ckpt, export(ckpt, root / "pkg", options=ExportOptions())
        return made[family]

    return get


def _hf(ckpt: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt, dtype="float32").eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_matches_pytorch_with_and_without_past(exported, family):
    import onnxruntime as ort
    import torch

    ckpt, pkg = exported(family)
    manifest = json.loads((pkg / "onnxllm.json").read_text())
    assert manifest["verification"]["max_abs_diff"] < 1e-4
    io = DecoderIO.from_manifest(read_manifest(pkg))
    graph = manifest["variants"]["fp32"]["method"]["graph"]
    for key, per_layer in FAMILIES[family][2].items():  # the feature is on, and the manifest says how it runs
        assert [layer[key] for layer in graph["layers"]] == per_layer, key
    switch = manifest["kv_cache"]["recompute_past_at"]
    assert switch == (SWITCH if "longrope" in family else 0)

    model = _hf(ckpt)
    sess = ort.InferenceSession(str(pkg / "onnx/model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    # (length, split): past the window and the LongRoPE switch, and short of it. A split across the switch
    # is not a parity case: transformers recomputes the cache there, and so does the runtime (next test).
    for length, split in ((LENGTH, 20), (12, 6)) + (() if switch else ((LENGTH, 10),)):
        ids = rng.integers(0, 256, size=(1, length)).astype(np.int64)
        with torch.no_grad():
            ref = model(torch.from_numpy(ids)).logits.numpy()
        full = io.run(sess, io.feed(ids)).logits
        np.testing.assert_allclose(full, ref, atol=1e-4, err_msg="without past")
        first = io.run(sess, io.feed(ids[:, :split]))
        rest = io.run(sess, io.feed(ids[:, split:], start=split, past=first.present)).logits
        np.testing.assert_allclose(rest, ref[:, split:], atol=1e-4, err_msg="with past")


def _runtime_greedy(pkg: Path, prompt: list[int], n: int, *, variant: str | None = None, **load) -> list[int]:
    import onnxllm
    from onnxllm.runtime.generate import GenerationConfig, generate_tokens

    m = onnxllm.load(pkg, variant=variant, **load)
    m.manifest.eos_token_ids.clear()  # all n tokens, as transformers with eos_token_id=None
    tokens = [ev.token for ev in generate_tokens(m.session, prompt, GenerationConfig(max_tokens=n, draft_tokens=0))
              if ev.token is not None]
    assert len(tokens) == n
    return tokens


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_greedy_tokens_equal_transformers_generate(exported, family):
    import torch

    ckpt, pkg = exported(family)
    model = _hf(ckpt)
    prompt = [5, 66, 70, 101, 32, 17, 240, 9, 88, 3]  # 10 + 20 tokens: past the window and the switch
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, len(prompt):].tolist()
    assert _runtime_greedy(pkg, prompt, 20) == hf  # shared buffer, IO binding
    assert _runtime_greedy(pkg, prompt, 20, kv_mode="growing") == hf


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("scheme", ["int4", "int8-dynamic"])
def test_family_quantized_variants_run(exported, family, scheme, tmp_path):
    from _helpers import IDS, TOLERANCE, logits, rel_rms

    from onnxllm.api import quantize
    from onnxllm.package import read_manifest

    _, base = exported(family)
    pkg = tmp_path / "pkg"
    shutil.copytree(base, pkg)
    quantize(pkg, scheme, evaluate=False)
    manifest = read_manifest(pkg)
    assert scheme in manifest.variants
    bound = TOLERANCE["int4"] if scheme == "int4" else 2 * TOLERANCE["int8"]  # as test_quantize*.py measure
    assert rel_rms(logits(pkg, "fp32", IDS), logits(pkg, scheme, IDS)) < bound
    assert len(_runtime_greedy(pkg, IDS[:10], 8, variant=scheme)) == 8


def test_longrope_crossing_recomputes_cache_in_chunks_and_rewinds(exported):
    """A prompt crossing the switch in chunks, and a rewind back below it, give transformers' logits."""
    import torch

    import onnxllm

    ckpt, pkg = exported("phi3-longrope-partial-fused")
    model = _hf(ckpt)
    ids = [int(i) for i in np.random.default_rng(3).integers(0, 256, LENGTH)]
    with torch.no_grad():
        long_ref = model(torch.tensor([ids])).logits[0, -1].numpy()
        short_ref = model(torch.tensor([ids[:12]])).logits[0, -1].numpy()
    m = onnxllm.load(pkg, prefill_chunk=8)  # chunks of 8: the first two end short of the switch
    np.testing.assert_allclose(m.session.forward(ids), long_ref, atol=1e-4)
    m.session.rewind(11)
    np.testing.assert_allclose(m.session.forward(ids[11:12]), short_ref, atol=1e-4)


def test_unsupported_family_names_supported_ones_and_docs(tmp_path):
    from onnxllm.exporter.architectures import REGISTRY, check_supported

    with pytest.raises(UnsupportedModelError) as err:
        check_supported("mamba")
    message = str(err.value)
    assert "'mamba'" in message and "docs/ARCHITECTURES.md" in message
    assert all(name in message for name in REGISTRY)
    assert (Path(__file__).parent.parent / "docs" / "ARCHITECTURES.md").is_file()


def test_export_help_and_readme_list_every_family():
    from click.testing import CliRunner

    from onnxllm.cli import cli
    from onnxllm.exporter.architectures import REGISTRY

    out = CliRunner().invoke(cli, ["export", "--help"], terminal_width=200).output
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    for name in REGISTRY:
        assert name in out, name
        assert f"`{name}`" in readme, name


def test_cli_exports_runs_and_says_how_the_graph_differs(tmp_path):
    """A family whose rotary dimension GroupQueryAttention cannot rotate: the CLI says so, the package runs."""
    from click.testing import CliRunner

    from onnxllm.cli import cli

    model_type, overrides, _ = FAMILIES["phi3-longrope-partial-outside"]
    ckpt = make_tiny_checkpoint(tmp_path, model_type, **overrides)
    runner = CliRunner()
    out = runner.invoke(cli, ["export", str(ckpt), "-o", str(tmp_path / "pkg")])
    assert out.exit_code == 0, out.output
    assert "graph: rotary dimension [24]" in out.output and "LongRoPE" in out.output
    run = runner.invoke(cli, ["run", str(tmp_path / "pkg"), "the", "--raw", "--max-tokens", "24", "--json"])
    assert run.exit_code == 0, run.output
    assert json.loads(run.output.strip().splitlines()[-1])["finish_reason"] in ("length", "eos")
