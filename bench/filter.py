"""Does filtering by a model help? Curate a noisy crawl with and without `alignment.model=`,
train the tiny config at the same compute on both, and compare.

    python -m bench.filter [--n 3000] [--noisy 0.3] [--steps 600] [--keep-fraction 0.7]

1. A clean crawl (seed 10) is curated and the tiny config trained on it for `--filter-steps`:
   the filter model (DataComp's recipe: a model trained on other, clean data scores pairs).
2. A noisy crawl (seed 11): `--noisy` of its clean rows carry the caption of another scene.
   It is curated twice: plainly, and with `alignment.model=` the filter model and
   `alignment.keep_fraction=`. Reported: the share of mismatched pairs among the kept rows.
3. The tiny config is trained for `--steps` on each (same batch, same steps), then both models
   are evaluated on the noisy crawl's held-out zero-shot sets (compositions no crawl has) and
   on retrieval over the clean crawl's shards (pairs neither model saw).

Every step runs the `mmray` command a user would, each starting its own local Ray; MLflow is
a SQLite store in the output folder. Prints one JSON line; the figures go in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

MMRAY = str(Path(sys.executable).with_name("mmray"))
TRAIN = "pipelines/configs/train/tiny.yaml"


def mmray(*args: str) -> dict:
    """Run ``mmray ARGS`` and return its JSON line; its log goes to stderr."""
    t0 = time.perf_counter()
    out = subprocess.run([MMRAY, *args], stdout=subprocess.PIPE, text=True, check=True).stdout
    print(f"# mmray {args[0]}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return json.loads(out.strip().splitlines()[-1])


def mismatched_kept(shards: Path) -> dict[str, float]:
    """Kept rows, and the share of them whose caption belongs to another scene (kind noisy)."""
    table = pq.read_table(sorted(shards.glob("[0-9]*.parquet")), columns=["status", "kind"])
    kept = table.filter(pc.equal(table.column("status"), "success"))
    noisy = pc.sum(pc.equal(kept.column("kind"), "noisy")).as_py() or 0
    return {"kept": len(kept), "mismatched_kept": noisy / max(1, len(kept))}


def workdir(path: str) -> Path:
    """The benchmark's folder, with its own MLflow store (SQLite) for every command."""
    out = Path(path).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{out}/mlflow.db"
    return out


def train(shards: Path, raw: Path, steps: int, out: Path, *overrides: str) -> dict:
    """The tiny config for ``steps``, evaluated once at the end (zero-shot on ``raw``'s
    held-out sets); the training job's result."""
    zeroshot = [f"--zeroshot={raw}/zeroshot/{task}" for task in ("colour", "shape")]
    return mmray("train", "--config", TRAIN, "--data", str(shards), *zeroshot,
                 f"schedule.max_steps={steps}", f"schedule.checkpoint_every={steps}",
                 f"eval.every={steps}", f"output={out}", *overrides)  # fmt: skip


def evaluate(model: str, raw: Path, clean_shards: Path) -> dict[str, float]:
    shape, colour = (
        mmray("eval", "zeroshot", "--model", model, "--image-folder", f"{raw}/zeroshot/{task}")
        for task in ("shape", "colour")
    )
    retrieval = mmray(
        "eval", "retrieval", "--model", model, "--data", str(clean_shards), "--limit", "1000"
    )
    return {"shape_top1": shape["top1"], "colour_top1": colour["top1"]} | {
        k: v for k, v in retrieval.items() if k.endswith(("r@1", "r@5"))
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=3000, help="rows of each crawl")
    p.add_argument("--noisy", type=float, default=0.3)
    p.add_argument("--keep-fraction", type=float, default=0.7)
    p.add_argument("--filter-steps", type=int, default=600)
    p.add_argument("--steps", type=int, default=600, help="training steps of each compared run")
    p.add_argument("--out", default="bench/out/filter")
    args = p.parse_args()
    out = workdir(args.out)
    clean, noisy = out / "clean", out / "noisy"
    mmray("sample-data", str(clean), "--n", str(args.n), "--seed", "10")
    mmray("sample-data", str(noisy), "--n", str(args.n), "--seed", "11", "--noisy",
          str(args.noisy))  # fmt: skip
    curate = ("curate", "--config", "pipelines/configs/curate_tiny.yaml")
    mmray(*curate, "--input", f"{clean}/metadata.parquet", "--output", f"{out}/clean-shards")
    scorer = train(out / "clean-shards", clean, args.filter_steps, out / "runs")["model_uri"]
    runs = {
        "unfiltered": [],
        "filtered": [f"alignment.model={scorer}", f"alignment.keep_fraction={args.keep_fraction}"],
    }
    result: dict = {"args": vars(args), "filter_model": scorer}
    for name, overrides in runs.items():
        shards = out / f"{name}-shards"
        curated = mmray(*curate, "--input", f"{noisy}/metadata.parquet", "--output", str(shards),
                        *overrides)  # fmt: skip
        result[name] = mismatched_kept(shards) | {"elapsed_s": curated["elapsed_s"]}
    for name in runs:
        model = train(out / f"{name}-shards", noisy, args.steps, out / "runs")["model_uri"]
        result[name] |= evaluate(model, noisy, out / "clean-shards")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
