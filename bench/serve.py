"""Load test of the Serve app on loopback: QPS and latency percentiles per endpoint and
concurrency, dynamic batching on and off, and the torch / ONNX / ONNX-int8 backends.

    python bench/serve.py [--duration 8] [--concurrency 1 8 32] [--haproxy] [--out FILE]

Serves the `tiny` training config's model (random weights: speed does not depend on them)
with the shipped serve.yaml settings on a local Ray, then, per variant, drives text embed,
image embed and classify requests from asyncio clients for --duration seconds at each
concurrency (every request bounded by a 30 s timeout). The clients share the machine's cores
with the server. --haproxy runs Serve's HAProxy ingress and throughput-optimised data plane
(RAY_SERVE_ENABLE_HA_PROXY=1, RAY_SERVE_THROUGHPUT_OPTIMIZED=1; needs `haproxy` on PATH)
instead of the default Python proxy. Prints one JSON line per measurement and a Markdown
table; record the figures in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
import torch

from mmcore.config import load_config
from mmcore.data.sample import make_sample_data
from mmcore.export import save_model
from mmcore.models.model import build_model
from pipelines.api import config_from
from pipelines.serve import CONFIG, build
from pipelines.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {  # name: (backend, max_batch_size)
    "batched": ("torch", 32),
    "unbatched": ("torch", 1),
    "batched, onnx": ("onnx", 32),
    "batched, onnx-int8": ("onnx-int8", 32),
}
WORDS = "red green blue yellow purple orange circle square triangle star cross diamond".split()


def payloads(sample: Path) -> dict[str, list[dict]]:
    """A few dozen distinct requests per endpoint, so no cache answers them."""
    rng = np.random.default_rng(0)
    files = sorted((sample / "images").glob("*.jpg"))[:32]
    images = [base64.b64encode(f.read_bytes()).decode() for f in files]
    texts = [f"a {' '.join(rng.choice(WORDS, 3))}" for _ in range(64)]
    labels = ["red", "green", "blue", "yellow", "purple", "orange"]
    return {
        "text embed": [{"path": "/v1/embed", "json": {"texts": [t]}} for t in texts],
        "image embed": [{"path": "/v1/embed", "json": {"images": [i]}} for i in images],
        "classify": [{"path": "/v1/classify", "json": {"image": i, "labels": labels}}
                     for i in images],
    }  # fmt: skip


async def load(url: str, requests: list[dict], concurrency: int, duration: float) -> dict:
    latencies, errors, done = [], 0, time.perf_counter() + duration
    timeout = aiohttp.ClientTimeout(total=30)

    async def client(i: int, session: aiohttp.ClientSession) -> None:
        nonlocal errors
        n = i
        while time.perf_counter() < done:
            req = requests[n % len(requests)]
            n += concurrency
            t0 = time.perf_counter()
            try:
                async with session.post(url + req["path"], json=req["json"]) as res:
                    await res.read()
                    ok = res.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            latencies.append(time.perf_counter() - t0) if ok else None
            errors += not ok

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i, session) for i in range(concurrency)))
        wall = time.perf_counter() - t0
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {
        "requests": len(latencies) + errors, "qps": round(len(latencies) / wall, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p95_ms": round(float(np.percentile(ms, 95)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "error_rate": round(errors / max(1, len(latencies) + errors), 4),
    }  # fmt: skip


def engine_costs(model_dir: Path, threads: int = 1) -> list[dict]:
    """In-process model cost per item by batch size, on one thread like a 1-CPU replica."""
    from PIL import Image

    from mmcore.export import load_model
    from mmcore.inference import Engine

    torch.set_num_threads(threads)
    engine = Engine(load_model(model_dir))
    texts = [f"a {' '.join(WORDS[i % 12 : i % 12 + 3])}" for i in range(32)]
    images = [Image.new("RGB", (128, 128), (7 * i, 90, 160)) for i in range(32)]
    rows = []
    for kind, encode, items in (("text", engine.embed_texts, texts),
                                ("image", engine.embed_images, images)):  # fmt: skip
        for batch in (1, 4, 32):
            encode(items[:batch])
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 2:
                encode(items[:batch])
                n += batch
            ms = 1000 * (time.perf_counter() - t0) / n
            rows.append({"engine": kind, "batch": batch, "ms_per_item": round(ms, 2)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def deploy(model_dir: Path, backend: str, batch: int) -> None:
    from ray import serve

    overrides = [f"model.uri={model_dir}", f"model.backend={backend}",
                 f"model.max_batch_size={batch}", "replicas.max_replicas=1"]  # fmt: skip
    cfg, _ = config_from(CONFIG, overrides)
    serve.run(build(cfg), name="mmray", route_prefix="/")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--haproxy", action="store_true", help="Serve's HAProxy ingress")
    p.add_argument("--engine-only", action="store_true", help="only the in-process model cost")
    p.add_argument("--out", default=str(ROOT / "bench/out/serve.json"))
    args = p.parse_args()
    import ray
    from ray import serve

    work = Path(tempfile.mkdtemp(prefix="mmray-bench-serve-"))
    make_sample_data(work / "sample", n=120, seed=0)
    torch.manual_seed(0)
    tiny = ROOT / "pipelines/configs/train/tiny.yaml"
    model_cfg = load_config(TrainConfig, tiny, [f"data.path={work}"]).model
    model_dir = save_model(build_model(model_cfg), work / "model")
    if args.engine_only:
        engine_costs(model_dir)
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.haproxy:  # read by the Serve controller, proxy and replicas Ray starts below
        os.environ |= {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    ray.init(num_cpus=4, object_store_memory=300 << 20, include_dashboard=False,
             log_to_driver=False)  # fmt: skip
    port = 8000 + os.getpid() % 1000
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url, reqs, rows = f"http://127.0.0.1:{port}", payloads(work / "sample"), []
    for variant in args.variants:
        backend, batch = VARIANTS[variant]
        deploy(model_dir, backend, batch)
        for endpoint, requests in reqs.items():
            asyncio.run(load(url, requests, 4, 2.0))  # warm up: prompt cache, allocator
            for c in args.concurrency:
                row = {"proxy": "haproxy" if args.haproxy else "default", "variant": variant,
                       "endpoint": endpoint, "concurrency": c}  # fmt: skip
                row |= asyncio.run(load(url, requests, c, args.duration))
                print(json.dumps(row), flush=True)
                rows.append(row)
    serve.shutdown()
    ray.shutdown()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print("\n| variant | endpoint | concurrency | QPS | p50 ms | p95 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [r[k] for k in ("variant", "endpoint", "concurrency", "qps", "p50_ms", "p95_ms")]
        print("| " + " | ".join(map(str, cells)) + f" | {r['p99_ms']} | {r['error_rate']:.1%} |")
    for endpoint in reqs:
        at = {r["variant"]: r["qps"] for r in rows if r["endpoint"] == endpoint
              and r["concurrency"] == max(args.concurrency)}  # fmt: skip
        if "batched" in at and "unbatched" in at:
            ratio = at["batched"] / at["unbatched"]
            print(f"{endpoint}: batching gives {ratio:.2f}x QPS at c={max(args.concurrency)}")


if __name__ == "__main__":
    main()
