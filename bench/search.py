"""Search index at scale: build time, per-query latency and recall@10 of ``mmcore.vectors``
against brute force (what Serve did before: every row's inner product, then the top k).

    python -m bench.search [--rows 10000 100000 1000000] [--dim 128] [--queries 300]

Random unit vectors (no cluster structure: the hard case for approximate search) at the
tiny model's width; queries one at a time, as /v1/search sends them. A benchmark prints
figures; record them in docs/BENCHMARKS.md with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from mmcore.vectors import VectorIndex


def _unit(rows: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ms(times: list[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(times, 50)) * 1e3, 2),
            "p99_ms": round(float(np.percentile(times, 99)) * 1e3, 2)}  # fmt: skip


def run(rows: int, dim: int, queries: int, k: int = 10) -> dict:
    rng = np.random.default_rng(rows)
    vectors, asks = _unit(rows, dim, rng), _unit(queries, dim, rng)
    keys = [str(i) for i in range(rows)]
    start = time.perf_counter()
    index = VectorIndex.build(vectors, keys, [""] * rows, "bench")
    build = time.perf_counter() - start
    exact, brute, found, engine = [], [], [], []
    for q in asks:
        t = time.perf_counter()
        scores = vectors @ q
        top = np.argpartition(-scores, k)[:k]
        exact.append(set(top[np.argsort(-scores[top])].tolist()))
        brute.append(time.perf_counter() - t)
        t = time.perf_counter()
        found.append({r for r, _ in index.search(q, k)})
        engine.append(time.perf_counter() - t)
    recall = np.mean([len(f & e) / k for f, e in zip(found, exact, strict=True)])
    return {"rows": rows, "dim": dim, "kind": index.meta["kind"], "build_s": round(build, 2),
            "recall_at_10": round(float(recall), 4), "index": _ms(engine),
            "brute_force": _ms(brute)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=300)
    args = p.parse_args()
    for rows in args.rows:
        print(json.dumps(run(rows, args.dim, args.queries)), flush=True)


if __name__ == "__main__":
    main()
