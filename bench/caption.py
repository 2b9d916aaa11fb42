"""Captioning at tiny scale: train a decoder, score its captions, time them through Serve.

    python -m bench.caption [--n 3000] [--steps 600] [--requests 40]

1. A sample crawl (seed 20) is curated and the tiny config trained on it as `hybrid` with the
   clip, itm and caption objectives (`mmray train`, Ray Train + DeepSpeed): its evaluation
   logs eval/caption/bleu4 and eval/caption/cider on the held-out pairs (seen compositions).
2. Images of the held-out compositions (no crawl image or caption has them) are rendered with
   captions as the crawl writes them ("a large green triangle"), written as a shard, and
   scored with `mmray eval caption`, greedy and with 3 beams.
3. `mmray serve` serves the model; `--requests` sequential /v1/caption requests of held-out
   images, greedy then 3 beams: latency p50/p99 per image, the client on the same 2 cores.

Prints one JSON line; the figures go in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import requests
import webdataset as wds

from bench.filter import mmray, train, workdir
from mmcore.data.sample import BACKGROUNDS, COLOURS, SHAPES, heldout, render
from pipelines.local import free_port


def heldout_shard(folder: Path, n: int, seed: int = 0) -> list[bytes]:
    """``n`` single-object images of held-out compositions and their captions, as a shard;
    returns the images as PNG bytes."""
    rng = np.random.default_rng(seed)
    combos = [(c, s) for c in COLOURS for s in SHAPES if heldout(c, s)]
    folder.mkdir(parents=True, exist_ok=True)
    pngs = []
    with wds.TarWriter(str(folder / "00000.tar")) as sink:
        for i in range(n):
            colour, shape = combos[i % len(combos)]
            size = ("small", "large")[i % 2]
            x, y = rng.uniform(0.35, 0.65, size=2)
            background = list(BACKGROUNDS)[i % len(BACKGROUNDS)]
            image = render(rng, 128, 128, [(size, colour, shape, x, y)], background)
            buf = io.BytesIO()
            image.save(buf, "PNG")
            pngs.append(buf.getvalue())
            caption = f"a {size} {colour} {shape}"
            sink.write({"__key__": f"{i:09d}", "jpg": image.convert("RGB"), "txt": caption})
    return pngs


def latency(url: str, pngs: list[bytes], beams: int) -> dict[str, float]:
    times = []
    for png in pngs:
        body = {"image": base64.b64encode(png).decode(), "num_beams": beams}
        t0 = time.perf_counter()
        requests.post(f"{url}/v1/caption", json=body, timeout=60).raise_for_status()
        times.append(time.perf_counter() - t0)
    ms = 1000 * np.asarray(times)
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=3000, help="rows of the crawl")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--out", default="bench/out/caption")
    args = p.parse_args()
    out = workdir(args.out)
    raw, shards = out / "raw", out / "shards"
    mmray("sample-data", str(raw), "--n", str(args.n), "--seed", "20")
    mmray("curate", "--config", "pipelines/configs/curate_tiny.yaml", "--input",
          f"{raw}/metadata.parquet", "--output", str(shards))  # fmt: skip
    trained = train(
        shards,
        raw,
        args.steps,
        out / "runs",
        "model.fusion=hybrid",
        "loss.terms={clip: 1.0, itm: 1.0, caption: 1.0}",
    )
    model = trained["model_uri"]
    metrics = trained["metrics"]
    result: dict = {
        "args": vars(args),
        "model": model,
        "seen": {
            k.split("/")[-1]: metrics[k] for k in ("eval/caption/bleu4", "eval/caption/cider")
        },
    }
    pngs = heldout_shard(out / "heldout", 200)
    for beams in (1, 3):
        scored = mmray("eval", "caption", "--model", model, "--data", str(out / "heldout"),
                       "--num-beams", str(beams))  # fmt: skip
        result[f"heldout_beams{beams}"] = {k: scored[k] for k in ("bleu4", "cider", "examples")}
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("mmray")), "serve", "--model",
                               model, "--port", str(port)], stdout=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{url}/healthz", timeout=5).ok:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        requests_ = pngs[: args.requests]
        latency(url, requests_[:5], 1)  # warm-up
        result["serve"] = {f"beams{b}": latency(url, requests_, b) for b in (1, 3)}
    finally:
        server.terminate()
        server.wait(60)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
