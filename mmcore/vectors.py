"""A search index over image embeddings (faiss), tied to the model version that embedded them.

Up to ``EXACT_MAX`` rows: exact inner-product search (``IndexFlatIP``). Above: a 4-bit
product-quantised scan (``PQ{dim/2}x4fs``: SIMD over 2 dimensions per 4-bit code), whose
best ``K_FACTOR × k`` candidates are re-ranked exactly (``RFlat``). Graph and inverted-list
indexes (HNSW, IVF) scan less but lose recall on embeddings without cluster structure;
this one scans every code and keeps recall@10 ≥ 0.95 against exact search at a million
vectors in a few milliseconds on 2 cores (``bench/search.py``, docs/BENCHMARKS.md).

A saved index is a folder: ``index.faiss``, ``records.parquet`` (``key``, ``caption`` per
row) and ``index.json`` (the model version, width, kind, rows). ``load`` refuses an index
built by another model version than the one that will query it.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from mmcore import storage
from mmcore.config import ConfigError

# faiss logs at INFO which of its builds it tried to load (AVX2, then generic) on import.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)
EXACT_MAX = 20_000
K_FACTOR = 64
META, FAISS, RECORDS = "index.json", "index.faiss", "records.parquet"


@dataclasses.dataclass
class VectorIndex:
    index: Any  # a faiss index of inner products over unit vectors
    keys: list[str]
    captions: list[str]
    meta: dict[str, Any]

    @classmethod
    def build(
        cls, vectors: np.ndarray, keys: list[str], captions: list[str], model_version: str
    ) -> VectorIndex:
        import faiss

        vectors = np.ascontiguousarray(vectors, np.float32)
        rows, dim = vectors.shape
        if rows == 0:
            raise ValueError("the search index is empty")
        if rows <= EXACT_MAX or dim % 2:
            kind, index = "flat", faiss.IndexFlatIP(dim)
        else:
            kind = f"PQ{dim // 2}x4fs,RFlat"
            index = faiss.index_factory(dim, kind, faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
        index.add(vectors)
        meta = {"model_version": model_version, "dim": dim, "kind": kind, "rows": rows}
        return cls(index, keys, captions, meta)

    def __len__(self) -> int:
        return len(self.keys)

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The ``k`` rows nearest ``query`` (E,), best first: (row, inner product)."""
        import faiss

        if self.meta["kind"] != "flat":
            faiss.downcast_index(self.index).k_factor = K_FACTOR
        scores, rows = self.index.search(np.asarray(query, np.float32)[None], k)
        return [(int(r), float(s)) for r, s in zip(rows[0], scores[0], strict=True) if r >= 0]

    def save(self, folder: str) -> str:
        """To ``folder`` (local or a bucket prefix); returns it."""
        import faiss

        with tempfile.TemporaryDirectory() as tmp:
            faiss.write_index(self.index, str(Path(tmp) / FAISS))
            storage.put_file(Path(tmp) / FAISS, storage.join(folder, FAISS))
        storage.write_parquet(storage.join(folder, RECORDS),
                              pa.table({"key": self.keys, "caption": self.captions}))  # fmt: skip
        storage.write_json(storage.join(folder, META), self.meta)  # last: the commit marker
        return folder

    @classmethod
    def load(cls, folder: str | Path, model_version: str) -> VectorIndex:
        """A saved index, for the model ``model_version`` names (ConfigError otherwise)."""
        import faiss

        meta = read_meta(folder, model_version)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / FAISS
            local.write_bytes(storage.read_bytes(storage.join(str(folder), FAISS)))
            index = faiss.read_index(str(local))
        records = storage.read_parquet(storage.join(str(folder), RECORDS))
        keys, captions = (records.column(c).to_pylist() for c in ("key", "caption"))
        return cls(index, keys, captions, meta)


def locate(uri: str) -> str | None:
    """The folder of the saved index ``uri`` names (a folder, a bucket prefix, or an MLflow
    artifact URI such as ``runs:/ID/indexes/NAME``, downloaded), or None if it holds none."""
    if uri.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        from mmcore.tracking import download_artifacts

        try:
            local = download_artifacts(uri)
        except Exception as e:  # noqa: BLE001 - MLflow's errors vary by store
            raise ConfigError(f"the index {uri} cannot be downloaded: {e}") from e
        return str(local) if (local / META).exists() else None
    return uri if storage.exists(storage.join(uri, META)) else None


def read_meta(folder: str | Path, model_version: str | None = None) -> dict[str, Any]:
    """``index.json`` of a saved index; ConfigError if ``folder`` holds none, or if another
    model version than ``model_version`` (when given) built it."""
    path = storage.join(str(folder), META)
    if not storage.exists(path):
        raise ConfigError(f"{folder} holds no search index ({META}): build one with mmray index")
    meta = storage.read_json(path)
    if model_version is not None and meta["model_version"] != model_version:
        raise ConfigError(
            f"the index {folder} was built from {meta['model_version']}'s embeddings; the "
            f"model is {model_version}: build one for it (mmray embed, then mmray index)"
        )
    return meta


def close_pairs(vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of rows of ``vectors`` (unit, N × E) whose inner product is at least
    ``threshold``, as (later row, earlier row) arrays. Up to ``EXACT_MAX`` rows, exact; above,
    an inverted-file index (``IVF{4√N},Flat``, 16 lists probed per query) range-searched, so
    the work grows with N·√N, not N²: near copies sit close enough to share a list, which the
    unit tests check on random vectors with planted copies."""
    import faiss

    vectors = np.ascontiguousarray(vectors, np.float32)
    rows, dim = vectors.shape
    if rows <= EXACT_MAX:
        index = faiss.IndexFlatIP(dim)
    else:
        lists = int(4 * np.sqrt(rows))
        index = faiss.index_factory(dim, f"IVF{lists},Flat", faiss.METRIC_INNER_PRODUCT)
        index.train(vectors[np.random.default_rng(0).permutation(rows)[: 64 * lists]])
        faiss.downcast_index(index).nprobe = 16
    if rows:
        index.add(vectors)
    later, earlier = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for start in range(0, rows, 10_000):  # bounded result buffers
        lims, _, found = index.range_search(vectors[start : start + 10_000], threshold)
        query = start + np.repeat(np.arange(len(lims) - 1), np.diff(lims).astype(np.int64))
        below = found < query  # each pair once, from its later row
        later.append(query[below])
        earlier.append(found[below])
    return np.concatenate(later), np.concatenate(earlier).astype(np.int64)
