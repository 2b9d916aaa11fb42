"""Training overhead and memory: Ray Train + DeepSpeed vs a bare PyTorch loop; ZeRO stages.

    python bench/train.py [--part throughput|memory|hold|shuffle|split|quality] [--steps 60]

1. Throughput: the training job (`pipelines.train.run`, 2 workers, ZeRO-2, Ray Data
   decoding and augmenting the curated shards) against a bare single-process PyTorch loop
   (all cores, the same model, global batch, optimizer and preprocessing, from the same
   shard bytes held in memory). Samples/s from the median step time after a warm-up; the
   job's data-wait fraction is the share of step time spent waiting for the next batch.
2. Memory: per-worker model-state bytes (parameters, gradients, optimizer state) for ZeRO
   stages 0-3 on 2 workers: the live CPU tensors of a worker after one optimizer step and
   a second backward pass (activations freed, gradients not yet), counted once per storage.

3. Hold (only with --part hold): the job with the shards held in the object store (read
   once, ``data.hold_fraction=1``) against read every epoch (``=0``), alternated, twice
   each, ``--steps`` steps on the 10 % split: mean and median step time, data wait.

   Shuffle (only with --part shuffle): the same with ``data.shuffle_buffer`` 1000, 256
   and 0, alternated, twice each, on all the shards: what waiting for the buffer to fill
   at each epoch's start costs.

4. Split (only with --part split): reading the training split of the shards (no decoding),
   the shipped batch filter (`in_split`, pyarrow) against a row filter (`Dataset.filter`),
   alternated, five times each: wall seconds on the local Ray.

5. Quality (only with --part quality): the `tiny` config as shipped, on the sample crawl:
   wall time of the whole job and its final zero-shot (held-out colour × shape
   compositions) and retrieval metrics.

Builds its data once (sample crawl → curated shards, cached in bench/out/). Prints figures;
record them in docs/BENCHMARKS.md with the command and the machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from mmcore.config import load_config
from mmcore.data.inputs import preprocess
from mmcore.inference import trim_batch
from mmcore.losses.fusion import compute_losses
from mmcore.models.model import build_model
from mmcore.models.towers import TextMemo
from mmcore.training import cosine_lr, param_groups
from pipelines.local import curated_shards
from pipelines.train import TrainConfig, run

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"

WARMUP = 10  # steps left out of the medians


def shards(n: int) -> Path:
    """Curated shards of a sample crawl of n rows (built once)."""
    from mmcore.data.sample import make_sample_data

    out = OUT / f"train-shards-{n}"
    if not (out / "manifest.json").exists():
        make_sample_data(OUT / f"train-sample-{n}", n=n, seed=0)
        curated_shards(OUT / f"train-sample-{n}", out)
    return out


def job_throughput(cfg: TrainConfig) -> dict:
    """The training job as users run it; step times from its MLflow metrics."""
    import mlflow

    uri = f"sqlite:///{OUT / 'bench-train-mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    result = run(cfg)
    client = mlflow.MlflowClient(uri)

    def values(name: str) -> list[float]:
        history = client.get_metric_history(result["run_id"], name)
        return [m.value for m in sorted(history, key=lambda m: m.step) if m.step > WARMUP]

    step, wait = values("train/step_time_s"), values("train/data_wait_s")
    return {
        "samples_per_s": cfg.schedule.global_batch / statistics.median(step),
        "step_s_mean": statistics.mean(step),
        "step_s_median": statistics.median(step),
        "data_wait_fraction": sum(wait) / sum(step),
        "steps_measured": len(step),
    }


def bare_throughput(cfg: TrainConfig, data: Path, steps: int) -> dict:
    """One process, all cores: read shard bytes → preprocess → forward/backward → AdamW."""
    torch.set_num_threads(os.cpu_count() or 1)
    rows: dict[str, dict] = {}
    for tar in sorted(data.glob("*.tar")):
        with tarfile.open(tar) as f:
            for member in f.getmembers():
                key, ext = member.name.rsplit(".", 1)
                rows.setdefault(key, {"__key__": key})[ext] = f.extractfile(member).read()
    samples = [r for r in rows.values() if "jpg" in r and "txt" in r]
    torch.manual_seed(0)
    model = build_model(cfg.model)
    if cfg.data.text_cache:  # as the job does
        model.text_memo = TextMemo(model.text, cfg.data.text_cache)
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, 5))
    batch_size, times = cfg.schedule.global_batch, []
    for step in range(steps):
        start = time.perf_counter()
        chunk = [samples[(step * batch_size + i) % len(samples)] for i in range(batch_size)]
        batch = preprocess(
            {k: [r[k] for r in chunk] for k in ("__key__", "jpg", "txt")},
            cfg.model.vision.image_size, cfg.model.text.context_length,
            cfg.data.augment, seed=step,
        )  # fmt: skip
        tensors = trim_batch({k: torch.from_numpy(v) for k, v in batch.items()})
        total, _ = compute_losses(model, tensors, cfg.loss.terms)
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        times.append(time.perf_counter() - start)
    return {"samples_per_s": batch_size / statistics.median(times[WARMUP:])}


def memory_func(config: dict) -> None:
    """A Ray Train worker: two ZeRO steps on random inputs, then its live tensor bytes."""
    import ray.train

    from mmcore.engine import build_engine

    cfg = config["cfg"]  # a TrainConfig, as the training job passes it
    engine, _ = build_engine(cfg)
    micro = engine.train_micro_batch_size_per_gpu()
    size, length = cfg.model.vision.image_size, cfg.model.text.context_length
    for step in range(2):  # measured after the second backward: weights, grads, Adam state
        pixels = torch.randn(micro, 3, size, size)
        ids = torch.randint(1000, 2000, (micro, length))
        inputs = {"pixels": pixels, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
        total, _ = compute_losses(engine.module, inputs, cfg.loss.terms)
        engine.backward(total)
        if step == 0:
            engine.step()
    del pixels, ids, total
    gc.collect()
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]  # C++-held
    seen, nbytes = set(), 0
    for obj in [*gc.get_objects(), *grads]:
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            if storage.data_ptr() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                nbytes += storage.nbytes()
    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory() as folder:  # Ray keeps metrics with checkpoints only
        (Path(folder) / f"rank{rank}.json").write_text(json.dumps(nbytes))
        ray.train.report({}, checkpoint=ray.train.Checkpoint.from_directory(folder))


def memory_by_stage(overrides: list[str], storage: Path) -> dict[int, float]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = {}
    for stage in (0, 1, 2, 3):
        cfg = load_config(TrainConfig, None, [*overrides, f"deepspeed.stage={stage}"])
        trainer = TorchTrainer(
            memory_func, train_loop_config={"cfg": cfg},
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ScalingConfig(num_workers=2),
            run_config=RunConfig(name=f"zero-memory-{stage}-{int(time.time())}",
                                 storage_path=str(storage)),
        )  # fmt: skip
        with trainer.fit().checkpoint.as_directory() as folder:
            ranks = [json.loads(f.read_text()) / 2**20 for f in Path(folder).glob("rank*.json")]
        out[stage] = max(ranks)  # MiB, the larger of the two workers
        print(f"ZeRO-{stage}: {ranks} MiB per worker", flush=True)
    return out


def quality(config: str, data: Path, sample: Path) -> dict:
    """The shipped config, evaluated on the held-out compositions: wall time and metrics."""
    folders = [str(sample / "zeroshot" / task) for task in ("colour", "shape")]
    cfg = load_config(TrainConfig, ROOT / config, [
        f"data.path={data}", f"eval.zeroshot={json.dumps(folders)}",
        f"output={OUT / 'train-runs'}", "tracking.experiment=bench-train-quality",
    ])  # fmt: skip
    start = time.perf_counter()
    result = run(cfg)
    chance = {f"chance/{Path(f).name}/top1": 1 / len(list(Path(f).iterdir())) for f in folders}
    evals = {k: v for k, v in result["metrics"].items() if k.startswith("eval/")}
    chance["chance/retrieval_r5"] = 5 / evals["eval/retrieval/n_pairs"]
    return {"wall_s": time.perf_counter() - start, **evals, **chance}


def split_read(data: Path, fraction: float = 0.1) -> dict[str, list[float]]:
    import numpy as np
    import ray.data

    from mmcore.data.inputs import held_out, in_split
    from pipelines.job import shard_paths
    from pipelines.progress import ray_data_bars_off

    ray_data_bars_off()

    def seconds(kind: str) -> float:
        ds = ray.data.read_webdataset(shard_paths(str(data)), decoder=None)
        if kind == "row":
            ds = ds.filter(lambda row: not held_out(row["__key__"], fraction))
        else:
            ds = ds.map_batches(in_split, fn_args=(fraction, False), batch_size=None,
                                batch_format="pyarrow")  # fmt: skip
        ds = ds.map_batches(lambda b: {"n": np.array([len(b["__key__"])])}, batch_size=64)
        start = time.perf_counter()
        sum(int(row["n"]) for row in ds.iter_rows())
        return time.perf_counter() - start

    seconds("batch")  # warm-up: worker processes and their imports
    times: dict[str, list[float]] = {"row": [], "batch": []}
    for _ in range(5):
        for kind, values in times.items():
            values.append(round(seconds(kind), 2))
    return times


def main() -> None:
    import ray

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--n", type=int, default=1200, help="sample crawl rows")
    p.add_argument("--config", default="pipelines/configs/train/tiny.yaml")
    p.add_argument("--memory-model", default="small", help="vision/text size for the ZeRO part")
    p.add_argument("--part", action="append",
                   choices=["throughput", "memory", "hold", "shuffle", "split", "quality"],
                   help="repeatable; default: throughput and memory")  # fmt: skip
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    # With a dashboard, as `mmray train` starts its Ray: without one, Ray Train's placement-group
    # cleaner printed "Failed to query Ray Train Controller actor state" every second.
    ray.init(num_cpus=4, object_store_memory=500 << 20, dashboard_host="127.0.0.1")
    data = shards(args.n)
    parts, figures = args.part or ["throughput", "memory"], {}
    if "quality" in parts:
        figures["quality"] = quality(args.config, data, OUT / f"train-sample-{args.n}")
    if "split" in parts:
        figures["split_read_s"] = split_read(data)
    overrides = [
        f"data.path={data}", f"schedule.max_steps={args.steps}", "schedule.log_every=1",
        f"schedule.checkpoint_every={args.steps}", "eval.every=0", "data.val_fraction=0",
        f"output={OUT / 'train-runs'}", "tracking.experiment=bench-train",
        "data.text_cache_dir=",  # text features computed afresh in each run, as the bare loop
    ]  # fmt: skip
    if "hold" in parts:
        held = ["data.val_fraction=0.1"]
        figures["hold"] = [
            {"hold_fraction": hold} | job_throughput(load_config(
                TrainConfig, ROOT / args.config, [*overrides, *held, f"data.hold_fraction={hold}"]
            ))
            for hold in (1, 0, 1, 0)
        ]  # fmt: skip
    if "shuffle" in parts:  # data.shuffle_buffer: what waiting for the buffer costs
        figures["shuffle"] = [
            {"shuffle_buffer": size} | job_throughput(load_config(
                TrainConfig, ROOT / args.config, [*overrides, f"data.shuffle_buffer={size}"]
            ))
            for size in (1000, 256, 0, 1000, 256, 0)
        ]  # fmt: skip
    if "throughput" in parts:
        cfg = load_config(TrainConfig, ROOT / args.config, overrides)
        job, bare = job_throughput(cfg), bare_throughput(cfg, data, args.steps)
        overhead = 1 - job["samples_per_s"] / bare["samples_per_s"]
        figures |= {"job": job, "bare": bare, "overhead": overhead}
    if "memory" in parts:
        memory = memory_by_stage([
            f"data.path={data}", f"model.vision.size={args.memory_model}",
            "model.vision.image_size=64", "model.text.kind=transformer",
            f"model.text.size={args.memory_model}", "schedule.global_batch=8",
        ], OUT / "train-runs")  # fmt: skip
        figures |= {"memory_mib": memory, "zero3_vs_zero0": memory[3] / memory[0]}
    print(json.dumps(figures))
    ray.shutdown()


if __name__ == "__main__":
    main()
