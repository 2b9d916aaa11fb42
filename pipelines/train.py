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

import contextlib
import dataclasses
import functools
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from mmcore import storage
from mmcore.config import ConfigError, load_config, to_dict
from mmcore.data.inputs import in_split, preprocess
from mmcore.data.transforms import TransformConfig
from mmcore.engine import CHECKPOINT_TAG, Evaluator, build_engine, consolidate, train_step
from mmcore.eval.run import has_questions
from mmcore.export import save_model
from mmcore.models.model import build_model
from mmcore.models.variants import trains_decoder
from mmcore.tracking import (
    EVAL_SETUP_TAG,
    MODEL_TAG,
    lineage_tags,
    log_metrics_to,
    log_model,
    start_run,
    tracking_uri,
)
from mmcore.training import TrainConfig, within
from mmcore.warmstart import plan
from pipelines import flags, job
from pipelines.progress import Progress, ray_data_bars_off

log = logging.getLogger(__name__)


# --- per worker ----------------------------------------------------------------------------


@contextlib.contextmanager
def _own_copy(checkpoint):
    """The checkpoint's files in a folder of this process's own. Ray's ``as_directory`` shares
    one download among a node's processes, and a rank that takes its download lock just after
    another rank released it downloads again over the files that rank is reading: a torn
    read on resume from object storage. On a local disk the files are read where they are."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield checkpoint.path
        return
    with tempfile.TemporaryDirectory(prefix="mmray-resume-") as folder:
        yield checkpoint.to_directory(folder)


def train_func(config: dict[str, Any]) -> None:
    """One Ray Train worker: the DeepSpeed engine, then steps until ``schedule.max_steps``,
    with evaluation, logging and checkpoints at step boundaries (``_boundary``)."""
    import ray.train

    cfg: TrainConfig = config["cfg"]  # validated once, in the driver
    rank = ray.train.get_context().get_world_rank()
    # ZeRO calls torch's all_gather_into_tensor, deprecated since torch 2.13. Its warning came
    # back every few steps (Ray Data's batch conversion resets the warnings registry): most
    # of a job's log.
    warnings.filterwarnings("ignore", "`torch.distributed.all_gather_into_tensor`", FutureWarning)
    # Ray Train's "Reporting training result" line, from each rank at each report, is logged
    # under its module's file path instead of ray.train, out of LoggingConfig's reach (run()).
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    init = ray.get(config["init"]) if config["init"] is not None else None  # init.from
    engine, sched = build_engine(cfg, init)
    epoch, skip = 0, 0  # the data position: epoch, and micro-batches of it already consumed
    if checkpoint := ray.train.get_checkpoint():
        with _own_copy(checkpoint) as folder:
            _, position = engine.load_checkpoint(folder, tag=CHECKPOINT_TAG)
        epoch, skip = position["epoch"], position["batches"]
        log.info("rank %d resumed at step %d (epoch %d, batch %d)",
                 rank, engine.global_steps, epoch, skip)  # fmt: skip
    val = functools.partial(_first_val_batch, cfg.eval.max_pairs) if config["has_val"] else None
    evaluator = Evaluator(cfg, rank, val)
    generator = torch.Generator().manual_seed(cfg.schedule.seed * 1000 + rank)
    shard = ray.train.get_dataset_shard("train")
    micro, last = engine.train_micro_batch_size_per_gpu(), cfg.schedule.max_steps
    progress = None
    if rank == 0:  # samples/s at the steps' rate, not one step's (a slow one made it 37, not 270)
        samples = ("samples", cfg.schedule.global_batch)
        progress = Progress("train", last, "steps", done=engine.global_steps, per_unit=samples)
    pending: list[dict[str, float]] = []  # the accumulation window's micro-batch losses
    mark = time.perf_counter()
    while engine.global_steps < last:
        consumed = 0
        batches = shard.iter_torch_batches(
            batch_size=micro, drop_last=True, **shuffled(cfg, rank, epoch)
        )
        stalled = functools.partial(_stalled, rank)
        for consumed, batch in enumerate(within(batches, cfg.data.stall_timeout_s, stalled), 1):
            if consumed <= skip:  # seen before the restart
                mark = time.perf_counter()
                continue
            waited = time.perf_counter() - mark
            metrics = train_step(engine, sched, batch, cfg, generator, pending)
            if metrics is None:  # inside a gradient-accumulation window
                continue
            elapsed = time.perf_counter() - mark  # the step's micro-batches, all ranks
            metrics |= {
                "train/samples_per_s": cfg.schedule.global_batch / elapsed,
                "train/step_time_s": elapsed, "train/data_wait_s": waited, "train/epoch": epoch,
            }  # fmt: skip
            position = {"epoch": epoch, "batches": consumed}
            _boundary(engine, cfg, config, evaluator, metrics, rank, position)
            if progress is not None:
                progress.update(1, **progress_fields(metrics))
            mark = time.perf_counter()
            if engine.global_steps >= last:
                break
        if consumed <= skip and engine.global_steps < last:
            raise RuntimeError(f"an epoch gave worker {rank} no full batch of {micro} samples")
        epoch, skip = epoch + 1, 0
    if progress is not None:
        progress.close()
    if memo := engine.module.text_memo:
        memo.save(f"rank-{rank}")  # for the next run of this text tower


def progress_fields(metrics: dict[str, float]) -> dict[str, float]:
    """A step's metrics as the progress line shows them: loss and the last evaluation's top-1
    and R@5 (``eval/zeroshot/shape/top1`` → ``shape``)."""
    fields = {"loss": metrics["train/loss"]}
    for key, value in metrics.items():
        if key.startswith("eval/") and key.endswith(("/top1", "_r5")):
            fields[key.split("/")[-2] if key.endswith("/top1") else key.split("/")[-1]] = value
    return fields


def _boundary(
    engine: Any, cfg: TrainConfig, config: dict[str, Any], evaluator: Evaluator,
    metrics: dict[str, float], rank: int, position: dict[str, int],
) -> None:  # fmt: skip
    """After an optimizer step: evaluate (every ``eval.every`` and at the end), log to MLflow
    from rank 0, and report to Ray (with a checkpoint every ``checkpoint_every``)."""
    import ray.train

    sch, step = cfg.schedule, engine.global_steps
    last = step >= sch.max_steps
    evaluate = last or (cfg.eval.every and step % cfg.eval.every == 0)
    if evaluate:
        metrics |= evaluator(engine)  # every rank takes part (ZeRO-3 gathers weights)
    if rank == 0 and config["run_id"] and (step % sch.log_every == 0 or evaluate):
        log_metrics_to(config["run_id"], metrics, step, config["tracking_uri"])
    if last or (sch.checkpoint_every and step % sch.checkpoint_every == 0):
        _report(engine, metrics | {"step": step}, position)
    elif evaluate:  # eval metrics reach Ray (and Tune) at every evaluation
        ray.train.report(metrics | {"step": step})


def _stalled(rank: int, waited: float) -> str:
    import ray
    from ray._private.state import available_resources_per_node

    total, free = ray.cluster_resources().get("CPU", 0), ray.available_resources().get("CPU", 0)
    # A task runs on one node: 1.8 CPUs free as 0.9 on each of two nodes (two sweep trials of
    # one worker each, beside their trial processes' 0.1) start no Ray Data task.
    most = max((r.get("CPU", 0) for r in available_resources_per_node().values()), default=0)
    return (
        f"worker {rank} received no batch from Ray Data in {waited:g} s "
        f"(data.stall_timeout_s); the cluster has {total:g} CPU, {free:g} free, at most "
        f"{most:g} on one node. Ray Data's read and preprocessing tasks need a whole CPU on one "
        "node: when the training workers (and a sweep's trial processes) hold the rest, they "
        "never run. Give Ray more CPUs than scaling.num_workers x scaling.cpus_per_worker, or "
        "use fewer workers or concurrent trials. Also check that every node can read data.path"
    )


def _first_val_batch(max_pairs: int) -> dict[str, Any]:
    import ray.train

    val = ray.train.get_dataset_shard("val")
    return next(iter(val.iter_torch_batches(batch_size=max_pairs)))


def _report(engine: Any, metrics: dict[str, float], position: dict[str, int]) -> None:
    """Every rank saves its DeepSpeed files (with the data position) and reports them: Ray
    keeps all ranks' files."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        engine.save_checkpoint(folder, tag=CHECKPOINT_TAG, client_state=position)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


# --- driver --------------------------------------------------------------------------------


def _datasets(cfg: TrainConfig) -> dict[str, Any]:
    """Ray Data pipelines: shards → (filter to the split) → preprocess on CPU tasks."""
    import ray.data

    # Progress bars drawn from the split coordinator and the workers reach the driver's
    # stderr as thousands of re-drawn lines; the training loop reports progress itself.
    context = ray_data_bars_off()
    context.execution_options.preserve_order = cfg.data.deterministic
    seed = cfg.schedule.seed if cfg.data.deterministic else None

    # Questions go to training with the vqa objective, and to evaluation whenever the decoder
    # is trained and the data has them: a sweep then compares every decoder on eval/vqa/*.
    asked = trains_decoder(cfg.model.fusion, cfg.loss.terms)
    asked = asked and has_questions(cfg.data.val_path or cfg.data.path)

    room = cfg.data.hold_fraction * ray.cluster_resources().get("object_store_memory", 0)

    def prepared(path: str, augment: TransformConfig | None, split=None) -> ray.data.Dataset:
        tars = job.shard_paths(path)
        # Training reads its files in a new order each epoch (data.shuffle_buffer).
        reorder = augment is not None and cfg.data.shuffle_buffer and not cfg.data.deterministic
        ds = ray.data.read_webdataset(tars, decoder=None, shuffle="files" if reorder else None)
        if split is not None:  # (fraction, val)
            ds = ds.map_batches(in_split, fn_args=split, batch_size=None, batch_format="pyarrow")
        if room and _fits(tars, room):
            ds = ds.materialize()  # read once, not every epoch
        kwargs = {
            "image_size": cfg.model.vision.image_size,
            "context_length": cfg.model.text.context_length,
            "augment": augment,  # crops drawn afresh each epoch unless seeded (preprocess)
            "seed": seed,
            "qa": "vqa" in cfg.loss.terms if augment is not None else asked,
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
        "train": prepared(cfg.data.path, augment, (fraction, False)),
        "val": prepared(cfg.data.path, None, (fraction, True)),
    }


def shuffled(cfg: TrainConfig, rank: int, epoch: int) -> dict[str, int | None]:
    """``iter_torch_batches``' local shuffle for one worker's epoch (``data.shuffle_buffer``)."""
    if not cfg.data.shuffle_buffer:
        return {}
    seed = cfg.schedule.seed * 1_000_003 + rank * 1009 + epoch if cfg.data.deterministic else None
    return {"local_shuffle_buffer_size": cfg.data.shuffle_buffer, "local_shuffle_seed": seed}


def _fits(paths: list[str], room: float) -> bool:
    """Whether the files take at most ``room`` bytes (asked one by one until they do not)."""
    total = 0
    for path in paths:
        total += storage.info(path).size
        if total > room:
            return False
    return True


def run(
    cfg: TrainConfig, run_name: str = "train", parent_run_id: str | None = None,
    tags: dict[str, str] | None = None, callbacks: list | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Train, export and log. A Tune trial passes its sweep's ``parent_run_id`` and
    ``TuneReportCallback`` in ``callbacks``."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train import DataConfig as RayDataConfig
    from ray.train import ScalingConfig as RayScaling
    from ray.train.torch import TorchConfig, TorchTrainer

    # The workers run in a folder of Ray's: the zero-shot folders they read, as the user's
    # shell resolved them.
    zeroshot = [storage.absolute(folder) for folder in cfg.eval.zeroshot]
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, zeroshot=zeroshot))
    root = job.output_root(cfg.output)
    with start_run(cfg.tracking, run_name, parent_run_id, tags) as tracker:
        tracker.log_params(to_dict(cfg))
        # How its figures were measured: a sweep warm-started from this run compares them.
        tracker.set_tags(lineage_tags() | {EVAL_SETUP_TAG: json.dumps(cfg.eval_setup())})
        data = storage.absolute(cfg.data.path)
        if storage.exists(manifest := storage.join(data, "manifest.json")):  # the curated set
            digest = storage.read_json(manifest)["digest"]
            tracker.log_dataset(data, "train", digest, "training")
        tracker.log_dict(cfg.ds_config, "deepspeed_config.json")
        init = _warm_start(cfg, tracker)
        name = f"train-{tracker.run_id or int(time.time())}"
        datasets = _datasets(cfg)
        loop_config = {
            "cfg": cfg,
            "init": init,
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
                name=name, storage_path=root,  # a folder or a bucket: every rank's files
                failure_config=FailureConfig(max_failures=cfg.schedule.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                callbacks=callbacks or [],
                # Ray Train's INFO lines (worker group started, process group set up, every
                # checkpoint persisted and every report, from each rank: ~15 lines a sweep
                # trial) stay in the session's logs/train/ray-train-sys-*.log files.
                logging_config=LoggingConfig(log_level="WARNING"),
            ),
            datasets=datasets,
            dataset_config=RayDataConfig(datasets_to_split=["train"]),  # each worker: all of val
        )  # fmt: skip
        try:
            result = trainer.fit()
        except SystemExit:  # Ctrl-C: Ray Train's SIGINT handler aborted the run, then exits
            raise KeyboardInterrupt from None
        with result.checkpoint.as_directory() as folder:
            model = consolidate(Path(folder), build_model(cfg.model), cfg.deepspeed.stage)
        model.objectives = frozenset(cfg.loss.terms)
        with tempfile.TemporaryDirectory() as folder:
            local = save_model(model, Path(folder) / "model")
            model_uri = log_model(local) if tracker.run_id else None
            storage.upload_dir(local, export := storage.join(root, name, "model"))
        job.write_config(cfg, storage.join(root, name))
        model_uri = model_uri or export
        tracker.set_tags({MODEL_TAG: model_uri})  # for a sweep to register
        final = {k: v for k, v in result.metrics.items() if isinstance(v, int | float)}
        return {
            "run_id": tracker.run_id,
            "model_uri": model_uri,
            "export": export,
            "metrics": final,
        }


def _warm_start(cfg: TrainConfig, tracker: Any) -> Any:
    """``init.from``: the tensors every worker loads (in Ray's object store), logged and
    recorded in MLflow (the source's resolved version as a tag, ``init.json``); None without
    one."""
    import ray

    if not cfg.init.source:
        return None
    warm = plan(cfg.init, build_model(cfg.model))
    log.info(warm.describe())
    tags = {"mmray.init.from": warm.resolved}
    tracker.set_tags(tags | ({"mmray.init.run_id": warm.run_id} if warm.run_id else {}))
    tracker.log_dict(warm.summary(), "init.json")
    return ray.put(warm.state)


def parse_args(argv: list[str]) -> TrainConfig:
    p = flags.parser("mmray train", __doc__, flags.TRAIN, "YAML config (configs/train/*.yaml)")
    args = p.parse_args(argv)
    return load_config(TrainConfig, args.config, args.overrides, flags.values(args, flags.TRAIN))


def check(cfg: TrainConfig) -> None:
    """What must resolve before Ray and MLflow start: shards, eval folders, the output path,
    the tracking store and the warm start."""
    job.shard_paths(cfg.data.path)
    if cfg.data.val_path:
        job.shard_paths(cfg.data.val_path, "data.val_path")
    for folder in cfg.eval.zeroshot:
        job.check_input("eval.zeroshot", folder)
        if not Path(folder).is_dir():
            raise ConfigError(f"eval.zeroshot: {folder} is not a folder")
    if "vqa" in cfg.loss.terms and not has_questions(cfg.data.path):
        raise ConfigError(
            f"loss term vqa: the samples of {cfg.data.path} have no questions (a qa list in "
            "KEY.json): curate with --qa, e.g. the qa.parquet of mmray sample-data"
        )
    job.check_output("output", cfg.output)
    job.check_tracking(cfg.tracking)
    if cfg.init.source:  # the source is there and fits the parts named
        plan(cfg.init, build_model(cfg.model))


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
