from __future__ import annotations

import numpy as np
import pytest

from mmcore.config import ConfigError
from mmcore.vectors import EXACT_MAX, VectorIndex, close_pairs, locate


def _unit(rows: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _exact(vectors: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    return np.argsort(-(vectors @ query), kind="stable")[:k].tolist()


def test_a_small_index_is_exact_and_round_trips(tmp_path) -> None:
    vectors = _unit(500, 32, 0)
    keys = [f"{i:09d}" for i in range(500)]
    index = VectorIndex.build(vectors, keys, [f"caption {i}" for i in range(500)], "models:/m/1")
    assert index.meta == {"model_version": "models:/m/1", "dim": 32, "kind": "flat", "rows": 500}
    query = _unit(1, 32, 1)[0]
    hits = index.search(query, 5)
    assert [r for r, _ in hits] == _exact(vectors, query, 5)
    np.testing.assert_allclose([s for _, s in hits], np.sort(vectors @ query)[::-1][:5], atol=1e-5)
    assert locate(str(tmp_path)) is None  # no index here yet
    index.save(str(tmp_path / "index"))
    assert locate(str(tmp_path / "index")) == str(tmp_path / "index")
    again = VectorIndex.load(tmp_path / "index", "models:/m/1")
    assert again.search(query, 5) == hits and again.keys == keys
    assert again.captions[3] == "caption 3"
    with pytest.raises(ConfigError, match="built from models:/m/1's embeddings; the model is "):
        VectorIndex.load(tmp_path / "index", "models:/m/2")


def test_a_large_index_keeps_recall_against_exact_search() -> None:
    """Above EXACT_MAX rows: the quantised scan with exact re-ranking finds the exact top 10
    (recall@10 >= 0.95) on vectors without cluster structure, the hard case."""
    rows = EXACT_MAX + 10_000
    vectors = _unit(rows, 64, 2)
    index = VectorIndex.build(vectors, [str(i) for i in range(rows)], [""] * rows, "x")
    assert index.meta["kind"] == "PQ32x4fs,RFlat"
    queries = _unit(40, 64, 3)
    recall = np.mean([
        len({r for r, _ in index.search(q, 10)} & set(_exact(vectors, q, 10))) / 10
        for q in queries
    ])  # fmt: skip
    assert recall >= 0.95, recall


def test_an_empty_index_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        VectorIndex.build(np.zeros((0, 8), np.float32), [], [], "x")


@pytest.mark.parametrize("rows", [2_000, EXACT_MAX + 5_000])  # exact; inverted lists
def test_close_pairs_finds_planted_copies_and_nothing_below_the_threshold(rows: int) -> None:
    vectors = _unit(rows, 64, 2)
    copies = np.arange(0, rows - 1, 7)
    vectors[copies + 1] = vectors[copies] + 0.03 * _unit(len(copies), 64, 3)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    later, earlier = close_pairs(vectors, 0.95)
    assert set(zip(later.tolist(), earlier.tolist(), strict=True)) == {
        (int(c) + 1, int(c)) for c in copies
    }  # random unit vectors in 64 dimensions are far apart: only the copies are close
