"""Start-up of a short training run: what a 6-step run costs on a local Ray, twice in a row.

    python -m bench.startup [--steps 6] [--ray-default-pool]

The sample crawl (300 rows) curated once into shards, then two runs of the `tiny` config
(1 worker, ZeRO-2, deterministic data, tracking off) on one local Ray of 4 logical CPUs, as
the test suite and a sweep's trials run them. Prints each run's wall time: with a handful of
steps it is almost all start-up (Ray Train's controller and worker, DeepSpeed, Ray Data's
coordinator and task processes). ``--ray-default-pool`` starts Ray with its default idle-worker
policy instead of mmray's (``pipelines.job.RAY_SYSTEM_CONFIG``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import ray

from mmcore.config import load_config
from mmcore.data.sample import make_sample_data
from pipelines.job import RAY_SYSTEM_CONFIG
from pipelines.local import curated_shards
from pipelines.train import TrainConfig, run

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--ray-default-pool", action="store_true")
    args = p.parse_args()
    system = {} if args.ray_default_pool else dict(RAY_SYSTEM_CONFIG)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_sample_data(work / "sample", n=300, seed=1)
        ray.init(num_cpus=4, object_store_memory=400 << 20, log_to_driver=False,
                 _system_config=system)  # fmt: skip
        shards = curated_shards(work / "sample", work / "shards")
        overrides = [f"data.path={shards}", "data.deterministic=true", "scaling.num_workers=1",
                     f"schedule.max_steps={args.steps}", f"schedule.checkpoint_every={args.steps}",
                     "schedule.global_batch=16", "eval.every=0", "tracking.enabled=false",
                     f"output={work / 'runs'}"]  # fmt: skip
        cfg = load_config(TrainConfig, ROOT / "pipelines/configs/train/tiny.yaml", overrides)
        seconds = []
        for _ in range(2):
            t0 = time.perf_counter()
            run(cfg)
            seconds.append(round(time.perf_counter() - t0, 1))
        ray.shutdown()
    print(json.dumps({"steps": args.steps, "ray_default_pool": args.ray_default_pool,
                      "first_run_s": seconds[0], "second_run_s": seconds[1]}))  # fmt: skip


if __name__ == "__main__":
    main()
