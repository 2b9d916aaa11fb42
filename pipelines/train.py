"""Training job: pretrain any mmcore variant on curated shards with Ray Train + DeepSpeed ZeRO.

    mmray train --config pipelines/configs/train/tiny.yaml --data shards/ [key=value ...]
    ray job submit --working-dir . -- python -m pipelines.train --config ... --data ...

Ray Data reads the WebDataset shards and decodes, augments and tokenises them on CPU tasks;
each Ray Train worker takes its split (``get_dataset_shard``) and runs DeepSpeed (gloo on
CPU, nccl on GPU). Every ``checkpoint_every`` steps every rank saves its DeepSpeed shards and
reports them, so the Ray checkpoint holds all ranks' files; a restarted run resumes from it.
At the end the driver rebuilds full fp32 weights from the last checkpoint, exports them as
safetensors, logs the model to MLflow (``runs:/ID/model``) and prints one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mmcore.config import ConfigError, from_dict, load_config, to_dict
from mmcore.data.transforms import TransformConfig
from mmcore.export import save_model
from mmcore.losses.fusion import LossConfig, compute_losses
from mmcore.models.model import ModelConfig, build_model
from mmcore.tracking import TrackingConfig, log_metrics_to, log_model, start_run, tracking_uri
from mmcore.training import (
    DeepSpeedConfig,
    OptimConfig,
    cosine_lr,
    deepspeed_config,
    param_groups,
    preprocess,
)

log = logging.getLogger(__name__)
TAG = "ckpt"  # DeepSpeed checkpoint tag (not "latest": DeepSpeed writes a file of that name)


@dataclasses.dataclass(kw_only=True)
class DataConfig:
    path: str = ""  # folder of curated NNNNN.tar shards
    augment: TransformConfig = dataclasses.field(default_factory=TransformConfig)


@dataclasses.dataclass(kw_only=True)
class ScheduleConfig:
    global_batch: int = 64  # samples per optimizer step, over all workers
    max_steps: int = 300
    checkpoint_every: int = 100
    log_every: int = 10
    max_failures: int = 1  # worker-group restarts from the last checkpoint
    seed: int = 0


@dataclasses.dataclass(kw_only=True)
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = dataclasses.field(default_factory=DeepSpeedConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    scaling: ScalingConfig = dataclasses.field(default_factory=ScalingConfig)
    tracking: TrackingConfig = dataclasses.field(
        default_factory=lambda: TrackingConfig(experiment="mmray-train")
    )
    output: str = "runs"  # Ray Train storage: checkpoints and the final export

    def validate(self) -> None:
        if not self.data.path:
            raise ValueError("data.path (--data) is required")
        self.loss.check(self.model.fusion)
        deepspeed_config(
            self.deepspeed, self.optim, self.schedule.global_batch, self.scaling.num_workers
        )


# --- per worker ----------------------------------------------------------------------------


def train_func(config: dict[str, Any]) -> None:
    """One Ray Train worker: DeepSpeed engine, the training loop, checkpoints, rank-0 metrics."""
    import deepspeed
    import ray.train

    cfg = from_dict(TrainConfig, config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.schedule.seed)  # identical initial weights on every rank
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(
        param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
    )  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_lr(s, cfg.schedule.max_steps, cfg.optim.warmup_steps)
    )
    ds_config = deepspeed_config(cfg.deepspeed, cfg.optim, cfg.schedule.global_batch, world)
    engine, _, _, sched = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=ds_config
    )
    if checkpoint := ray.train.get_checkpoint():
        with checkpoint.as_directory() as folder:
            engine.load_checkpoint(folder, tag=TAG)
        log.info("rank %d resumed at step %d", rank, engine.global_steps)
    generator = torch.Generator().manual_seed(cfg.schedule.seed * 1000 + rank)
    shard = ray.train.get_dataset_shard("train")
    micro = ds_config["train_micro_batch_size_per_gpu"]
    mark = time.perf_counter()
    while engine.global_steps < cfg.schedule.max_steps:
        for batch in shard.iter_torch_batches(batch_size=micro, drop_last=True):
            waited = time.perf_counter() - mark
            total, terms = compute_losses(
                engine.module, batch["pixels"], batch["input_ids"], batch["attention_mask"],
                cfg.loss.terms, generator,
            )  # fmt: skip
            engine.backward(total)
            engine.step()
            if not engine.is_gradient_accumulation_boundary():
                continue
            step = engine.global_steps
            elapsed = time.perf_counter() - mark
            metrics = {f"train/{k}": v.item() for k, v in terms.items()} | {
                "train/loss": total.item(),
                "train/lr": sched.get_last_lr()[0],
                "train/logit_scale": engine.module.scales()[0].item(),
                "train/grad_norm": float(engine.get_global_grad_norm() or 0.0),
                "train/samples_per_s": micro * world / elapsed,
                "train/step_time_s": elapsed,
                "train/data_wait_s": waited,
            }
            if rank == 0 and config["run_id"] and step % cfg.schedule.log_every == 0:
                log_metrics_to(config["run_id"], metrics, step, config["tracking_uri"])
            if step % cfg.schedule.checkpoint_every == 0 or step >= cfg.schedule.max_steps:
                _checkpoint(engine, metrics | {"step": step})
            mark = time.perf_counter()
            if step >= cfg.schedule.max_steps:
                break


def _checkpoint(engine: Any, metrics: dict[str, float]) -> None:
    """Every rank saves its DeepSpeed files and reports them: Ray keeps all ranks' files."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        engine.save_checkpoint(folder, tag=TAG)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


# --- driver --------------------------------------------------------------------------------


def shard_paths(path: str) -> list[str]:
    """The curated shards to train on; a clear error when there are none."""
    tars = sorted(str(p) for p in Path(path).glob("*.tar"))
    if not tars:
        where = Path(path).resolve()
        raise ConfigError(f"no .tar shards in {where} (on a cluster: a path every node can read)")
    return tars


def _dataset(cfg: TrainConfig) -> Any:
    import ray.data

    tars = shard_paths(cfg.data.path)
    kwargs = {
        "image_size": cfg.model.vision.image_size,
        "context_length": cfg.model.text.context_length,
        "augment": dataclasses.replace(cfg.data.augment, image_size=cfg.model.vision.image_size),
        "seed": cfg.schedule.seed,
    }
    return ray.data.read_webdataset(tars, decoder=None).map_batches(
        preprocess, fn_kwargs=kwargs, batch_size=64, batch_format="numpy"
    )


def consolidate(checkpoint_dir: Path, cfg: TrainConfig) -> torch.nn.Module:
    """Full fp32 weights from a checkpoint of every rank's DeepSpeed shards."""
    model = build_model(cfg.model)
    if cfg.deepspeed.stage == 0:  # plain data parallel: rank 0 holds the whole model
        files = sorted((checkpoint_dir / TAG).glob("mp_rank_00_model_states.pt"))
        state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=TAG)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _lineage() -> dict[str, str]:
    """Package versions and the git commit, as run tags."""
    import subprocess
    from importlib.metadata import version

    tags = {f"version.{p}": version(p) for p in ("torch", "ray", "deepspeed", "transformers")}
    sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    tags["git_sha"] = sha.stdout.strip() if sha.returncode == 0 else "unknown"
    return tags


def run(cfg: TrainConfig) -> dict[str, Any]:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train import ScalingConfig as RayScaling
    from ray.train.torch import TorchConfig, TorchTrainer

    storage = Path(cfg.output).resolve()
    with start_run(cfg.tracking, run_name="train") as tracker:
        tracker.log_params(to_dict(cfg))
        tracker.set_tags(_lineage())
        manifest = Path(cfg.data.path) / "manifest.json"
        if manifest.exists():  # the curated dataset this run trains on
            digest = json.loads(manifest.read_text())["digest"]
            tracker.log_dataset(str(Path(cfg.data.path).resolve()), "train", digest, "training")
        ds_cfg = deepspeed_config(
            cfg.deepspeed, cfg.optim, cfg.schedule.global_batch, cfg.scaling.num_workers
        )
        tracker.log_dict(ds_cfg, "deepspeed_config.json")
        name = f"train-{tracker.run_id or int(time.time())}"
        loop_config = {
            "cfg": to_dict(cfg),
            "run_id": tracker.run_id,
            "tracking_uri": tracking_uri(),
        }
        trainer = TorchTrainer(
            train_func,
            train_loop_config=loop_config,
            torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
            scaling_config=RayScaling(
                num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
            ),
            run_config=RunConfig(
                name=name, storage_path=str(storage),
                failure_config=FailureConfig(max_failures=cfg.schedule.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
            datasets={"train": _dataset(cfg)},
        )  # fmt: skip
        result = trainer.fit()
        with result.checkpoint.as_directory() as folder:
            model = consolidate(Path(folder), cfg)
        export = save_model(model, storage / name / "model")
        model_uri = log_model(export) if tracker.run_id else str(export)
        final = {k: v for k, v in result.metrics.items() if isinstance(v, int | float)}
        return {
            "run_id": tracker.run_id,
            "model_uri": model_uri,
            "export": str(export),
            "metrics": final,
        }


def parse_args(argv: list[str]) -> TrainConfig:
    p = argparse.ArgumentParser(prog="mmray train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML config (pipelines/configs/train/*.yaml)")
    p.add_argument("--data", help="folder of curated shards (sets data.path)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = p.parse_args(argv)
    flags = [f"data.path={json.dumps(args.data)}"] if args.data else []
    return load_config(TrainConfig, args.config, flags + args.overrides)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
        shard_paths(cfg.data.path)  # before Ray and MLflow start
    except (ConfigError, ValueError) as e:
        print(f"mmray train: error: {e}", file=sys.stderr)
        return 2
    import ray

    if not ray.is_initialized():
        ray.init()
    print(json.dumps(run(cfg)))
    return 0


if __name__ == "__main__":
    # Run the importable module, not __main__: Ray pickles __main__'s classes by value, and
    # their string annotations would not resolve on the workers.
    from pipelines.train import main as module_main

    sys.exit(module_main())
