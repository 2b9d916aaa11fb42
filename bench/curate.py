"""Curation throughput: mmray curate (Ray Data) vs img2dataset, same corpus, same machine.

    python bench/curate.py [--n 3000] [--image-size 256] [--resize-mode center_crop]

Builds (once, cached in bench/out/) a corpus of photo-like images, 200-1200 px a side, mostly
JPEG, serves it over HTTP on 127.0.0.1 from a separate process, then runs each tool on it
as a fresh command (with --warm-ray, mmray joins a Ray cluster started beforehand, as under
`ray job submit`) with the same image size, resize mode, encode quality, shard size and
cores, and prints input rows/s for each (wall time of the whole command, start-up included)
and their ratio. img2dataset runs from its own virtualenv (.venv-img2dataset; `make
bench-venv`), since its pins (webdataset<0.3, pandas<3) clash with ours. A benchmark prints
figures; record them in docs/BENCHMARKS.md with the command and the machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from pipelines.local import free_port

ROOT = Path(__file__).resolve().parents[1]
CORES = os.cpu_count() or 1  # every tool gets all of them
OUT = ROOT / "bench" / "out"
I2D = ROOT / ".venv-img2dataset" / "bin" / "img2dataset"


def photo(rng: np.random.Generator) -> Image.Image:
    """A photo-like image: smooth colour field, a few shapes, sensor-like noise."""
    w, h = (int(v) for v in rng.integers(200, 1201, size=2))
    if max(w, h) / min(w, h) > 2.5:
        w = min(w, int(h * 2.5))
    field = Image.fromarray(rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8))
    img = field.resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 7))):
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.3) * min(w, h)
        fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    noisy = np.asarray(img, np.int16) + rng.normal(0, 6, size=(h, w, 3)).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def build_corpus(n: int, seed: int = 0) -> Path:
    corpus = OUT / f"corpus-{n}-{seed}"
    meta = corpus / "metadata.parquet"
    if meta.exists():
        return corpus
    images = corpus / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files, captions = [], []
    t0 = time.perf_counter()
    for i in range(n):
        fmt = "png" if i % 10 == 9 else "jpg"
        buf = io.BytesIO()
        photo(rng).save(buf, "PNG" if fmt == "png" else "JPEG", quality=90)
        (images / f"{i:06d}.{fmt}").write_bytes(buf.getvalue())
        files.append(f"{i:06d}.{fmt}")
        captions.append(f"a photo of some coloured circles, number {i}")
    pq.write_table(pa.table({"file": files, "caption": captions}), meta)
    size = sum(p.stat().st_size for p in images.iterdir()) / 2**20
    print(f"corpus: {n} images, {size:.0f} MiB, built in {time.perf_counter() - t0:.0f}s")
    return corpus


def timed(cmd: list[str], log: Path, env: dict | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, env=env, cwd=ROOT)
    elapsed = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}); see {log}")
    return elapsed, proc.stdout


def run_mmray(meta: Path, out: Path, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, "-m", "pipelines.curate", "--input", str(meta), "--output", str(out),
        "--image-size", str(args.image_size), "--resize-mode", args.resize_mode,
        "--encode-quality", "95", "--samples-per-shard", "1000", "--threads", "16",
        "tracking.enabled=false", f"compute.rows_per_task={args.rows_per_task}",
        "image.min_side=0", "image.max_aspect_ratio=100",  # img2dataset's filters: none
    ]  # fmt: skip
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0"}
    if args.warm_ray:  # a running cluster, as under `ray job submit`: no start-up per job
        ray = str(Path(sys.executable).with_name("ray"))
        head = [ray, "start", "--head", f"--num-cpus={CORES}", "--disable-usage-stats"]
        subprocess.run(head, check=True, capture_output=True, env=env)
        env["RAY_ADDRESS"] = "auto"
    try:
        wall, stdout = timed(cmd, OUT / "mmray.log", env)
    finally:
        if args.warm_ray:
            subprocess.run([ray, "stop", "--force"], capture_output=True, env=env)
    summary = json.loads(stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "kept": summary["n_samples"], "in_job_s": summary["elapsed_s"]}


def run_img2dataset(meta: Path, out: Path, args: argparse.Namespace) -> dict:
    cmd = [
        str(I2D), "--url_list", str(meta), "--input_format", "parquet", "--url_col", "url",
        "--caption_col", "caption", "--output_folder", str(out), "--output_format",
        "webdataset", "--image_size", str(args.image_size), "--resize_mode", args.resize_mode,
        "--encode_quality", "95", "--number_sample_per_shard", "1000", "--thread_count", "16",
        "--processes_count", str(CORES), "--distributor", "multiprocessing",
        "--timeout", "10", "--retries", "0", "--enable_wandb", "False",
    ]  # fmt: skip
    wall, _ = timed(cmd, OUT / "img2dataset.log")
    kept = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    return {"wall_s": wall, "kept": kept}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--resize-mode", default="center_crop")
    p.add_argument("--rows-per-task", type=int, default=250)
    p.add_argument("--skip-img2dataset", action="store_true")
    p.add_argument("--warm-ray", action="store_true", help="run mmray on a started Ray cluster")
    args = p.parse_args()
    corpus = build_corpus(args.n)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "pipelines.local", str(corpus / "images"), str(port)], cwd=ROOT
    )
    try:
        time.sleep(1.0)
        table = pq.read_table(corpus / "metadata.parquet")
        urls = [f"http://127.0.0.1:{port}/images/{f}" for f in table.column("file").to_pylist()]
        meta = OUT / "bench-metadata.parquet"
        pq.write_table(table.append_column("url", pa.array(urls)), meta)
        results = {}
        for name, fn in (("mmray", run_mmray), ("img2dataset", run_img2dataset)):
            if name == "img2dataset" and (args.skip_img2dataset or not I2D.exists()):
                continue
            out = OUT / f"shards-{name}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            results[name] = fn(meta, out, args)
    finally:
        server.terminate()
    ray_mode = "warm Ray cluster" if args.warm_ray else "Ray started by the job"
    print(f"\n{args.n} images, {args.image_size}px {args.resize_mode}, {CORES} cores, {ray_mode}")
    print(f"{'tool':<13}{'wall s':>9}{'rows/s':>9}{'per core':>10}{'kept':>7}")
    for name, r in results.items():
        rate = args.n / r["wall_s"]
        print(f"{name:<13}{r['wall_s']:>9.1f}{rate:>9.1f}{rate / CORES:>10.1f}{r['kept']:>7}")
    if "in_job_s" in results.get("mmray", {}):
        print(f"mmray in-job time (after Ray start-up): {results['mmray']['in_job_s']:.1f}s")
    if len(results) == 2:
        ratio = results["img2dataset"]["wall_s"] / results["mmray"]["wall_s"]
        print(f"mmray / img2dataset throughput: {ratio:.2f}x")


if __name__ == "__main__":
    main()
