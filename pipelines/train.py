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
import functools
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
from mmcore.eval.run import eval_metrics
from mmcore.export import save_model
from mmcore.losses.fusion import LossConfig, compute_losses
from mmcore.models.model import ModelConfig, build_model
from mmcore.models.towers import TextMemo
from mmcore.tracking import TrackingConfig, log_metrics_to, log_model, start_run, tracking_uri
from mmcore.training import (
    DeepSpeedConfig,
    OptimConfig,
    cosine_lr,
    deepspeed_config,
    held_out,
    param_groups,
    preprocess,
    trim_padding,
    within,
)
from pipelines import job

log = logging.getLogger(__name__)
TAG = "ckpt"  # DeepSpeed checkpoint tag (not "latest": DeepSpeed writes a file of that name)


@dataclasses.dataclass(kw_only=True)
class DataConfig:
    path: str = ""  # folder of curated NNNNN.tar shards
    val_path: str = ""  # curated shards for validation; empty: hold out val_fraction of path
    val_fraction: float = 0.02  # held out by a stable hash of each sample's key (0: none)
    augment: TransformConfig = dataclasses.field(default_factory=TransformConfig)
    # A locked text tower: each worker keeps the features of up to N distinct captions
    # (mmcore TextMemo; ~20 KB each for MiniLM). 0: off. Not under ZeRO-3, where every rank
    # must run the tower to gather its partitioned weights.
    text_cache: int = 0
    # A worker that gets no batch for this long stops the run with a diagnosis (0: waits
    # forever). Covers Ray Data's start-up, so it is generous.
    stall_timeout_s: float = 300.0

    def validate(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise ValueError("data.val_fraction must be in [0, 1)")
        if self.text_cache < 0 or self.stall_timeout_s < 0:
            raise ValueError("data.text_cache and data.stall_timeout_s must be >= 0")


@dataclasses.dataclass(kw_only=True)
class EvalConfig:
    every: int = 100  # steps between evaluations; the last step always evaluates
    zeroshot: list[str] = dataclasses.field(default_factory=list)  # DIR/<class name>/<images>
    max_pairs: int = 256  # validation pairs for retrieval (fusion variants score N² pairs)

    def validate(self) -> None:
        if self.every < 0 or self.max_pairs < 2:
            raise ValueError("need eval.every >= 0 and eval.max_pairs >= 2")


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
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = dataclasses.field(default_factory=DeepSpeedConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    scaling: ScalingConfig = dataclasses.field(default_factory=ScalingConfig)
    tracking: TrackingConfig = dataclasses.field(
        default_factory=lambda: TrackingConfig(experiment="mmray-train")
    )
    output: str = ""  # Ray Train storage (checkpoints, the export); empty: ~/ray_results

    def validate(self) -> None:
        if not self.data.path:
            raise ValueError("data.path (--data) is required")
        self.loss.check(self.model.fusion)
        if self.data.text_cache and not self.model.text.frozen:
            raise ValueError("data.text_cache needs a locked text tower (model.text.frozen=true)")
        deepspeed_config(
            self.deepspeed, self.optim, self.schedule.global_batch, self.scaling.num_workers
        )


# --- per worker ----------------------------------------------------------------------------


def train_func(config: dict[str, Any]) -> None:
    """One Ray Train worker: DeepSpeed engine, the training loop, evaluation, checkpoints."""
    import ray.train

    cfg = from_dict(TrainConfig, config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    engine, sched = _engine(cfg, world)
    if cfg.data.text_cache and cfg.deepspeed.stage == 3:
        log.warning("data.text_cache is off under ZeRO-3: every rank runs the text tower")
    elif cfg.data.text_cache:
        engine.module.text_memo = TextMemo(engine.module.text, cfg.data.text_cache)
    epoch, skip = 0, 0  # the data position: epoch, and micro-batches of it already consumed
    if checkpoint := ray.train.get_checkpoint():
        with checkpoint.as_directory() as folder:
            _, position = engine.load_checkpoint(folder, tag=TAG)
        epoch, skip = position["epoch"], position["batches"]
        log.info("rank %d resumed at step %d (epoch %d, batch %d)",
                 rank, engine.global_steps, epoch, skip)  # fmt: skip
    evaluator = Evaluator(cfg, rank, has_val=config["has_val"])
    generator = torch.Generator().manual_seed(cfg.schedule.seed * 1000 + rank)
    shard = ray.train.get_dataset_shard("train")
    micro = engine.train_micro_batch_size_per_gpu()
    stalled = functools.partial(_stalled, rank)
    sch, last = cfg.schedule, cfg.schedule.max_steps
    mark = time.perf_counter()
    while engine.global_steps < last:
        consumed = 0
        batches = shard.iter_torch_batches(batch_size=micro, drop_last=True)
        for consumed, batch in enumerate(
            within(batches, cfg.data.stall_timeout_s, stalled), start=1
        ):
            if consumed <= skip:  # seen before the restart
                mark = time.perf_counter()
                continue
            waited = time.perf_counter() - mark
            ids, mask = trim_padding(batch["input_ids"], batch["attention_mask"])
            total, terms = compute_losses(
                engine.module, batch["pixels"], ids, mask, cfg.loss.terms, generator
            )
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
                "train/samples_seen": step * sch.global_batch,
                "train/epoch": epoch,
            }
            evaluate = step >= last or (cfg.eval.every and step % cfg.eval.every == 0)
            if evaluate:
                metrics |= evaluator(engine)  # every rank takes part (ZeRO-3 gathers weights)
            if rank == 0 and config["run_id"] and (step % sch.log_every == 0 or evaluate):
                log_metrics_to(config["run_id"], metrics, step, config["tracking_uri"])
            if step % sch.checkpoint_every == 0 or step >= last:
                _report(engine, metrics | {"step": step}, {"epoch": epoch, "batches": consumed})
            elif evaluate:  # eval metrics reach Ray (and Tune) at every evaluation
                ray.train.report(metrics | {"step": step})
            mark = time.perf_counter()
            if step >= last:
                break
        if consumed <= skip and engine.global_steps < last:
            raise RuntimeError(f"an epoch gave worker {rank} no full batch of {micro} samples")
        epoch, skip = epoch + 1, 0


def _stalled(rank: int, waited: float) -> str:
    import ray

    total, free = ray.cluster_resources().get("CPU", 0), ray.available_resources().get("CPU", 0)
    return (
        f"worker {rank} received no batch from Ray Data in {waited:g} s "
        f"(data.stall_timeout_s); the cluster has {total:g} CPU, {free:g} free. When the "
        "training workers hold every CPU, Ray Data's read and preprocessing tasks never run: "
        "give Ray more CPUs than scaling.num_workers x scaling.cpus_per_worker, or use fewer "
        "workers. Also check that every node can read data.path"
    )


def _engine(cfg: TrainConfig, world: int) -> tuple[Any, Any]:
    """The DeepSpeed engine (identical initial weights on every rank) and its LR schedule."""
    import deepspeed

    torch.manual_seed(cfg.schedule.seed)
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
    return engine, sched


class Evaluator:
    """Evaluation during training: rank 0 scores a plain copy of the current weights
    (zero-shot folders, retrieval over validation pairs). Every rank must call it: under
    ZeRO-3 the partitioned weights are gathered collectively first."""

    def __init__(self, cfg: TrainConfig, rank: int, has_val: bool) -> None:
        self.cfg, self.rank, self.has_val = cfg, rank, has_val
        self.model = build_model(cfg.model).eval() if rank == 0 else None
        self.val: tuple[torch.Tensor, ...] | None = None

    def __call__(self, engine: Any) -> dict[str, float]:
        import deepspeed
        import ray.train

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            if self.model is not None:
                self.model.load_state_dict(engine.module.state_dict())
        if self.model is None:
            return {}
        if self.val is None and self.has_val:  # the first max_pairs validation pairs, kept
            val = ray.train.get_dataset_shard("val")
            batch = next(iter(val.iter_torch_batches(batch_size=self.cfg.eval.max_pairs)))
            self.val = (batch["pixels"], *trim_padding(batch["input_ids"], batch["attention_mask"]))
        metrics = eval_metrics(self.model, self.cfg.eval.zeroshot, self.val)
        return {f"eval/{k}": v for k, v in metrics.items()}


def _report(engine: Any, metrics: dict[str, float], position: dict[str, int]) -> None:
    """Every rank saves its DeepSpeed files (with the data position) and reports them: Ray
    keeps all ranks' files."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        engine.save_checkpoint(folder, tag=TAG, client_state=position)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


# --- driver --------------------------------------------------------------------------------


def shard_paths(path: str, key: str = "data.path") -> list[str]:
    """The curated shards to train on; a clear error when there are none."""
    job.check_input(key, path)
    tars = sorted(str(p) for p in Path(path).glob("*.tar"))
    if not tars:
        where = Path(path).resolve()
        raise ConfigError(f"no .tar shards in {where} (on a cluster: a path every node can read)")
    return tars


def _datasets(cfg: TrainConfig) -> dict[str, Any]:
    """Ray Data pipelines: shards → (filter to the split) → preprocess on CPU tasks."""
    import ray.data

    # Progress bars drawn from the split coordinator and the workers reach the driver's
    # stderr as thousands of re-drawn lines; the training loop reports progress itself.
    ray.data.DataContext.get_current().enable_progress_bars = False

    def prepared(path: str, augment: TransformConfig | None, keep=None) -> ray.data.Dataset:
        ds = ray.data.read_webdataset(shard_paths(path), decoder=None)
        if keep is not None:
            ds = ds.filter(keep)
        kwargs = {
            "image_size": cfg.model.vision.image_size,
            "context_length": cfg.model.text.context_length,
            "augment": augment,  # crops drawn afresh each epoch (see preprocess)
        }
        return ds.map_batches(preprocess, fn_kwargs=kwargs, batch_size=64, batch_format="numpy")

    augment = dataclasses.replace(cfg.data.augment, image_size=cfg.model.vision.image_size)
    fraction = 0.0 if cfg.data.val_path else cfg.data.val_fraction
    if not fraction:
        datasets = {"train": prepared(cfg.data.path, augment)}
        if cfg.data.val_path:
            datasets["val"] = prepared(cfg.data.val_path, None)
        return datasets
    return {
        "train": prepared(cfg.data.path, augment, functools.partial(_in_split, fraction, False)),
        "val": prepared(cfg.data.path, None, functools.partial(_in_split, fraction, True)),
    }


def _in_split(fraction: float, val: bool, row: dict[str, Any]) -> bool:
    return held_out(row["__key__"], fraction) == val


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


def run(
    cfg: TrainConfig, run_name: str = "train", parent_run_id: str | None = None,
    tags: dict[str, str] | None = None, callbacks: list | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Train, export and log. A Tune trial passes its sweep's ``parent_run_id`` and
    ``TuneReportCallback`` in ``callbacks``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train import DataConfig as RayDataConfig
    from ray.train import ScalingConfig as RayScaling
    from ray.train.torch import TorchConfig, TorchTrainer

    storage = job.output_root(cfg.output)
    with start_run(cfg.tracking, run_name, parent_run_id, tags) as tracker:
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
        datasets = _datasets(cfg)
        loop_config = {
            "cfg": to_dict(cfg),
            "has_val": "val" in datasets,
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
                callbacks=callbacks or [],
            ),
            datasets=datasets,
            dataset_config=RayDataConfig(datasets_to_split=["train"]),  # each worker: all of val
        )  # fmt: skip
        result = trainer.fit()
        with result.checkpoint.as_directory() as folder:
            model = consolidate(Path(folder), cfg)
        export = save_model(model, storage / name / "model")
        model_uri = log_model(export) if tracker.run_id else str(export)
        tracker.set_tags({"mmray.model_uri": model_uri})  # for a sweep to register
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
    add_data_flags(p)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = p.parse_args(argv)
    return load_config(TrainConfig, args.config, data_overrides(args) + args.overrides)


def add_data_flags(p: argparse.ArgumentParser) -> None:
    """--data, --val-data, --zeroshot: shorthands for training config keys."""
    p.add_argument("--data", help="folder of curated shards (sets data.path)")
    p.add_argument("--val-data", help="curated shards for validation (sets data.val_path)")
    p.add_argument("--zeroshot", action="append", default=[], metavar="DIR",
                   help="zero-shot eval folder DIR/<class name>/<images>; repeatable")  # fmt: skip


def data_overrides(args: argparse.Namespace) -> list[str]:
    """The data flags as key=value overrides of the training config."""
    flags = [f"data.path={json.dumps(args.data)}"] if args.data else []
    if args.val_data:
        flags.append(f"data.val_path={json.dumps(args.val_data)}")
    if args.zeroshot:
        flags.append(f"eval.zeroshot={json.dumps(args.zeroshot)}")
    return flags


def check(cfg: TrainConfig) -> None:
    """What must resolve before Ray and MLflow start: shards, eval folders, the output path and
    the tracking store."""
    shard_paths(cfg.data.path)
    if cfg.data.val_path:
        shard_paths(cfg.data.val_path, "data.val_path")
    for folder in cfg.eval.zeroshot:
        job.check_input("eval.zeroshot", folder)
        if not Path(folder).is_dir():
            raise ConfigError(f"eval.zeroshot: {folder} is not a folder")
    job.check_output("output", cfg.output)
    job.check_tracking(cfg.tracking)


def need(cfg: TrainConfig) -> job.Need:
    """The training workers, plus CPUs for Ray Data's read and preprocessing tasks."""
    s = cfg.scaling
    gpus = s.num_workers if s.use_gpu else 0
    return job.Need(cpus=s.num_workers * s.cpus_per_worker, gpus=gpus, data_cpus=2)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return job.main("mmray train", lambda: parse_args(argv), run, check, need)


if __name__ == "__main__":
    # Run the importable module, not __main__: Ray pickles __main__'s classes by value, and
    # their string annotations would not resolve on the workers.
    from pipelines.train import main as module_main

    sys.exit(module_main())
