"""Curation throughput: mmray curate (Ray Data) vs img2dataset, same corpus, same machine.

    python -m bench.curate [--n 4000] [--timeout 5] [--warm-ray] [--tracking false] [KEY=VALUE ...]
    python -m bench.curate --ray-floor

Builds (once, cached in bench/out/web-0/) a corpus that looks like a web crawl (``JUNK``:
hanging and dropped connections, 404s and 500s, corrupt bytes, tiny images and banners,
exact copies at other URLs, slow hosts, one-word file-name captions; photos of mixed sizes
up to 3000 px), serves it over HTTP on 127.0.0.1 from a separate process
(``pipelines.local.ImageServer``), then runs each tool on it as a fresh command, both cold:
mmray starts its own Ray (with --warm-ray it joins one started beforehand, as under `ray
job submit`) and creates a new embedded MLflow store. Same image size, resize mode, encode
quality, shard size, timeout, no retries, 16 download threads and all cores for both; prints
input rows/s for each (wall time of the whole command) and their ratio. img2dataset runs
from its own virtualenv (.venv-img2dataset; `make bench-venv`), since its pins
(webdataset<0.3, pandas<3) clash with ours. A benchmark prints figures; record them in
docs/BENCHMARKS.md with the command and the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import multiprocessing
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


NOISE = np.random.default_rng(1).normal(0, 6, size=(600, 600, 3)).astype(np.int16)


def photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A photo-like image: smooth colour field, a few shapes, sensor-like noise (a random
    window of a tiled noise field). Large ones are drawn at half size and upscaled."""
    if max(w, h) > 1200:
        return photo(rng, w // 2, h // 2).resize((w, h), Image.Resampling.BICUBIC)
    field = Image.fromarray(rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8))
    img = field.resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 7))):
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.3) * min(w, h)
        fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    y0, x0 = (int(v) for v in rng.integers(0, 600, size=2))
    noise = np.tile(NOISE, (h // 600 + 2, w // 600 + 2, 1))[y0 : y0 + h, x0 : x0 + w]
    return Image.fromarray(np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8))


# The junk of a web crawl, as shares of the rows (the rest are photos that download fine):
# what each row's URL does on the bench's host (pipelines.local.ImageServer's routes).
JUNK = {
    "hang": 0.007,  # the host never answers: the client's timeout ends it
    "drop": 0.003,  # the connection is closed unanswered
    "http404": 0.03,
    "http500": 0.01,
    "corrupt": 0.01,  # truncated or garbage bytes
    "tiny": 0.01,  # 8-31 px a side
    "extreme": 0.01,  # banners, 12:1 and more
    "duplicate": 0.05,  # the same bytes as an earlier row, at another URL
    "slow": 0.10,  # a slow host: 0.2-2 s before the answer
}
NO_FILE = {"hang", "drop", "http404", "http500", "duplicate"}


def _side(rng: np.random.Generator) -> tuple[int, int]:
    """Mixed sizes: 15 % small (64-200 px), 70 % medium (200-1200), 15 % large (to 3000)."""
    lo, hi = [(64, 200), (200, 1200), (1200, 3000)][rng.choice(3, p=[0.15, 0.7, 0.15])]
    w, h = (int(v) for v in rng.integers(lo, hi + 1, size=2))
    return min(w, int(h * 2.5)), min(h, int(w * 2.5))


@dataclasses.dataclass
class WebRow:
    kind: str  # "photo" or a key of JUNK
    caption: str
    name: str  # image file name (kinds that have one)
    size: tuple[int, int]
    draw: float  # uniform [0, 1): which earlier photo a duplicate copies, how late a host is


def web_row(i: int, seed: int) -> WebRow:
    """Row ``i`` of the web-like corpus, drawn from its own seed: a corpus of n rows is the
    first n rows of any larger one, and image files are made once."""
    rng = np.random.default_rng([seed, i])
    u, kind = rng.random(), "photo"
    for name, share in JUNK.items():
        if u < share:
            kind = name
            break
        u -= share
    png = rng.random() < 0.1  # only where the image is small: web PNGs are mostly graphics
    one_word = rng.random() < 0.05
    caption = f"IMG_{i:04d}.jpg" if one_word else f"a photo of some coloured circles, {i}"
    w, h = {"tiny": (int(rng.integers(8, 32)), int(rng.integers(8, 32))),
            "extreme": (int(rng.integers(1200, 3000)), int(rng.integers(60, 100)))
            }.get(kind) or _side(rng)  # fmt: skip
    name = f"{i:06d}.{'png' if png and max(w, h) <= 600 else 'jpg'}"
    return WebRow(kind, caption, name, (w, h), float(rng.random()))


def make_image(row: WebRow, images: Path, seed: int, i: int) -> None:
    path = images / row.name
    if path.exists():
        return
    rng = np.random.default_rng([seed, i, 1])
    buf = io.BytesIO()
    photo(rng, *row.size).save(buf, "PNG" if row.name.endswith("png") else "JPEG", quality=90)
    data = buf.getvalue()
    if row.kind == "corrupt":  # the first half, or as many random bytes
        data = data[: len(data) // 2] if rng.random() < 0.5 else rng.bytes(len(data) // 2)
    path.write_bytes(data)


def url_path(row: WebRow, i: int, photos: list[str]) -> str:
    """What the row's URL asks of the bench's host (``pipelines.local.ImageServer``)."""
    match row.kind:
        case "hang":
            return "slow/600"  # answers after the client's timeout
        case "drop":
            return "drop"
        case "http404":
            return f"images/gone-{i}.jpg"
        case "http500":
            return "status/500"
        case "duplicate" if photos:
            return f"{photos[int(row.draw * len(photos))]}?copy={i}"
        case "slow":
            return f"late/{0.2 + 1.8 * row.draw:.2f}/{row.name}"
    return f"images/{row.name}"


def build_corpus(n: int, seed: int = 0) -> Path:
    """The web-like corpus of ``n`` rows: images/ and metadata-N.parquet (path, caption)."""
    corpus = OUT / f"web-{seed}"
    meta = corpus / f"metadata-{n}.parquet"
    if meta.exists():
        return meta
    images = corpus / "images"
    images.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = [web_row(i, seed) for i in range(n)]
    with_file = [(r, images, seed, i) for i, r in enumerate(rows) if r.kind not in NO_FILE]
    with multiprocessing.Pool(CORES) as pool:
        pool.starmap(make_image, with_file, chunksize=16)
    paths, photos = [], []
    for i, row in enumerate(rows):
        paths.append(url_path(row, i, photos))
        if row.kind == "photo":
            photos.append(paths[-1])
    captions = [r.caption for r in rows]
    pq.write_table(pa.table({"path": paths, "caption": captions}), meta)
    size = sum(p.stat().st_size for p in images.iterdir()) / 2**20
    print(f"corpus: {n} rows, {size:.0f} MiB of images, built in {time.perf_counter() - t0:.0f}s")
    return meta


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
        "--timeout", str(args.timeout), "--retries", "0",
        f"tracking.enabled={args.tracking}",
        "image.min_side=0", "image.max_aspect_ratio=100",  # img2dataset's filters: none
        *args.overrides,
    ]  # fmt: skip
    # A user's first run: a new embedded MLflow store (the run, params, artifacts, lineage).
    store = OUT / "mlflow-bench"
    subprocess.run(["rm", "-rf", str(store)], check=True)
    store.mkdir(parents=True)
    env = os.environ | {
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}",
    }
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
    print("mmray:", summary["status_counts"])
    return {"wall_s": wall, "kept": summary["n_samples"], "in_job_s": summary["elapsed_s"]}


def run_img2dataset(meta: Path, out: Path, args: argparse.Namespace) -> dict:
    cmd = [
        str(I2D), "--url_list", str(meta), "--input_format", "parquet", "--url_col", "url",
        "--caption_col", "caption", "--output_folder", str(out), "--output_format",
        "webdataset", "--image_size", str(args.image_size), "--resize_mode", args.resize_mode,
        "--encode_quality", "95", "--number_sample_per_shard", "1000", "--thread_count", "16",
        "--processes_count", str(CORES), "--distributor", "multiprocessing",
        "--timeout", str(args.timeout), "--retries", "0", "--enable_wandb", "False",
    ]  # fmt: skip
    wall, _ = timed(cmd, OUT / "img2dataset.log")
    stats = [json.loads(p.read_text()) for p in out.glob("*_stats.json")]
    errors: dict[str, int] = {}
    for shard in stats:
        for message, count in shard["status_dict"].items():
            errors[message[:40]] = errors.get(message[:40], 0) + count
    print("img2dataset:", dict(sorted(errors.items(), key=lambda kv: -kv[1])[:8]))
    kept = sum(shard["successes"] for shard in stats)
    return {"wall_s": wall, "kept": kept}


# The least any job on a Ray it starts itself can take: Python, `ray.init` as mmray curate
# calls it, one Ray Data pass of four tasks that do nothing, and the exit (Ray's shutdown).
FLOOR = """
from pipelines import job
job.init_ray(job.Need(cpus=0.5, dashboard=False))
import ray.data
ds = ray.data.from_items([{"part": i} for i in range(4)], override_num_blocks=4)
for _ in ds.map_batches(lambda b: b, batch_size=None, num_cpus=0.5).iter_batches():
    pass
"""


def ray_floor(repeats: int = 3) -> None:
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-c", FLOOR]
    walls = [timed(cmd, OUT / "floor.log", env)[0] for _ in range(repeats)]
    print("Ray's floor (start, a Ray Data pass of 4 empty tasks, exit):",
          ", ".join(f"{w:.1f}s" for w in walls))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--resize-mode", default="center_crop")
    p.add_argument("--skip-img2dataset", action="store_true")
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--warm-ray", action="store_true", help="run mmray on a started Ray cluster")
    p.add_argument("--tracking", default="true", help="mmray's tracking.enabled")
    p.add_argument("--ray-floor", action="store_true", help="time Ray's own start and exit")
    p.add_argument("overrides", nargs="*", help="more KEY=VALUE settings for mmray")
    args = p.parse_args()
    if args.ray_floor:
        return ray_floor()
    corpus = build_corpus(args.n)
    port = free_port()
    images = corpus.parent / "images"
    server = subprocess.Popen([sys.executable, "-m", "pipelines.local", str(images), str(port)])
    try:
        time.sleep(1.0)
        table = pq.read_table(corpus)
        urls = [f"http://127.0.0.1:{port}/{path}" for path in table.column("path").to_pylist()]
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
    print(f"\n{args.n} rows, {args.image_size}px {args.resize_mode}, {CORES} cores, {ray_mode}")
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
