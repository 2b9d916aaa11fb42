"""Dedup at scale: the curation job's dedup stage (pipelines/dedup.py) over 1, 2 and 4 million
synthetic hash rows on a local Ray, reporting wall time and the driver's peak RSS.

    python -m bench.dedup [--rows 1000000 2000000 4000000] [--near/--no-near] [--one-process]

Each size is written once (bench/out/dedup-N/: staged pieces of 100 000 rows, as the curation
job stages them; 10 % exact copies of earlier rows, 5 % near copies within 3 bits) and
deduplicated in a fresh process that starts its own Ray, so every driver starts equal; its
peak RSS (ru_maxrss) is the figure to compare across sizes. ``--one-process`` measures instead
what the driver held before dedup ran on the cluster: every staged row's hash columns as
Python lists (the input of ``mmcore.data.dedup.find_duplicates``). A benchmark prints figures;
record them in docs/BENCHMARKS.md with the command and the machine.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
PIECE_ROWS, SAMPLES_PER_SHARD = 100_000, 10_000
GREY = bytes([128] * 48)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64: a fixed pseudo-random 64-bit hash of each id."""
    x = (x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def build(rows: int, seed: int = 0) -> Path:
    """Staged pieces of ``rows`` successes: ids 10 % repeated (exact copies), 5 % near
    copies of an earlier id (1-3 bits of its phash flipped)."""
    from mmcore import storage

    folder = OUT / f"dedup-{rows}-{seed}"
    if (folder / "done").exists():
        return folder
    rng = np.random.default_rng(seed)
    for start in range(0, rows, PIECE_ROWS):
        i = np.arange(start, min(start + PIECE_ROWS, rows))
        kind = rng.random(len(i))
        source = np.where(kind < 0.15, (rng.random(len(i)) * np.maximum(i, 1)).astype(np.int64), i)
        ids = np.where(kind < 0.10, source, i)  # exact copies share the id (sha256, phash)
        phash = _mix(np.where(kind < 0.15, source, i))
        near = (kind >= 0.10) & (kind < 0.15)
        flips = np.zeros(len(i), np.uint64)
        for _ in range(3):
            bit = rng.integers(0, 64, len(i)).astype(np.uint64)
            flips |= np.where(near & (rng.random(len(i)) < 0.8), np.uint64(1) << bit, 0)
        keys = [f"{k // SAMPLES_PER_SHARD:05d}{k % SAMPLES_PER_SHARD:04d}" for k in i.tolist()]
        table = pa.table({
            "key": keys, "status": ["success"] * len(i),
            "sha256": [f"{v:064x}" for v in ids.tolist()],
            "phash": pa.array(phash ^ flips, pa.uint64()), "thumb": [GREY] * len(i),
        })  # fmt: skip
        storage.write_parquet(str(folder / "pieces" / f"{start // PIECE_ROWS:05d}_.parquet"), table)
    (folder / "done").touch()
    return folder


def run_one(folder: Path, rows: int, near: bool) -> dict:
    """In this (fresh) process: start Ray, dedup, report time and peak RSS."""
    import ray

    from mmcore import storage
    from mmcore.data.dedup import DedupConfig
    from pipelines.dedup import deduplicate
    from pipelines.job import RAY_SYSTEM_CONFIG

    ray.init(num_cpus=os.cpu_count(), object_store_memory=1 << 30, log_to_driver=False,
             logging_level="ERROR", _system_config=dict(RAY_SYSTEM_CONFIG))  # fmt: skip
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    work = str(folder / "work")
    storage.delete_dir(work)
    t0 = time.perf_counter()
    decisions = deduplicate(
        DedupConfig(near=near), storage.list_files(str(folder / "pieces")), 9, [], work, rows
    )
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # before counting the results
    counts = collections.Counter()
    for path in storage.list_files(decisions):
        found = pc.value_counts(storage.read_parquet(path, ["status"]).column("status"))
        counts.update({v["values"].as_py(): v["counts"].as_py() for v in found})
    return {
        "rows": rows, "near": near, "wall_s": round(wall, 1),
        "driver_peak_rss_mb": round(peak / 1024),
        "driver_rss_after_ray_init_mb": round(rss_start / 1024),
        "exact_duplicates": counts["duplicate"], "near_duplicates": counts["near_duplicate"],
    }  # fmt: skip


def one_process_index(folder: Path, rows: int) -> dict:
    """The hash columns of every kept row in this process, as the driver once loaded them."""
    from mmcore import storage

    columns = ["key", "sha256", "phash", "thumb"]
    t0 = time.perf_counter()
    table = pa.concat_tables(storage.read_parquet(p, [*columns, "status"])
                             for p in storage.list_files(str(folder / "pieces")))  # fmt: skip
    table = table.filter(pc.equal(table.column("status"), "success"))
    index = {c: table.column(c).to_pylist() for c in columns}
    return {
        "rows": rows, "one_process_index": len(index["key"]),
        "load_s": round(time.perf_counter() - t0, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 2_000_000, 4_000_000])
    p.add_argument("--near", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--one-process", action="store_true", help="the old driver's index only")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process's size
    args = p.parse_args()
    if args.one:
        measure = one_process_index if args.one_process else partial(run_one, near=args.near)
        print(json.dumps(measure(build(args.one), args.one)))
        return
    flag = "--one-process" if args.one_process else "--near" if args.near else "--no-near"
    for rows in args.rows:
        build(rows)
        child = subprocess.run([sys.executable, "-m", "bench.dedup", "--one", str(rows), flag],
                               capture_output=True, text=True, cwd=ROOT)  # fmt: skip
        if child.returncode:
            raise SystemExit(child.stderr[-3000:])
        print(child.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
