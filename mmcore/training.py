"""The training job's config and its building blocks, plain PyTorch (``pipelines/train.py``
composes them on Ray Train).

    cfg = load_config(TrainConfig, "pipelines/configs/train/tiny.yaml", ["data.path=shards"])
    cfg.ds_config                                         # the DeepSpeed JSON, built once
    ds_cfg = deepspeed_config(DeepSpeedConfig(stage=2), OptimConfig(), global_batch=64, world=2)
    groups = param_groups(model, weight_decay=0.1)        # no decay on gains, biases, scalars
    factor = cosine_lr(step, max_steps=1000, warmup=50)   # LambdaLR factor
    for batch in within(loader, timeout_s=300, stalled=lambda t: f"no batch in {t} s"): ...

The CPU step Ray Data maps over the shards is ``mmcore.data.inputs.preprocess``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal, TypeVar

import torch

from mmcore import storage
from mmcore.data.transforms import TransformConfig
from mmcore.losses.fusion import LossConfig
from mmcore.models.model import ModelConfig
from mmcore.tracking import TrackingConfig
from mmcore.warmstart import InitConfig

T = TypeVar("T")


@dataclasses.dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.1  # on weight matrices only (see param_groups)
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.98])  # CLIP's
    eps: float = 1e-6
    warmup_steps: int = 50  # linear warm-up, then cosine decay to 0
    grad_clip: float = 1.0  # max global gradient norm (0: off)

    def validate(self) -> None:
        # lr 0 is allowed: a warm start then keeps its weights (checks, evaluation runs)
        if self.lr < 0 or self.weight_decay < 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError("need lr, weight_decay, warmup_steps and grad_clip >= 0")
        if self.eps < 0 or len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError("need eps >= 0 and two betas in [0, 1)")


@dataclasses.dataclass(kw_only=True)
class DeepSpeedConfig:
    stage: int = 2  # ZeRO stage 0 (plain data parallel), 1, 2 or 3
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state on the CPU
    offload_params: bool = False  # stage 3 only: parameters on the CPU
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16/fp16 need GPUs
    grad_accum: int = 1  # micro-batches per optimizer step
    # Communication buckets, in elements. DeepSpeed's defaults (5e8) preallocate GBs, sized
    # for billion-parameter models; HF Trainer's "auto" uses hidden², open_clip-scale is ~1e7.
    bucket_elements: int = 5_000_000

    def validate(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ValueError("stage must be 0, 1, 2 or 3")
        if self.offload_params and self.stage != 3:
            raise ValueError("offload_params needs stage 3")
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("offload_optimizer needs ZeRO stage 1, 2 or 3")
        if self.grad_accum < 1:
            raise ValueError("grad_accum must be >= 1")
        if self.bucket_elements < 1:
            raise ValueError("bucket_elements must be >= 1")


def deepspeed_config(
    ds: DeepSpeedConfig, optim: OptimConfig, global_batch: int, world: int
) -> dict[str, Any]:
    """The DeepSpeed JSON config for ``global_batch`` samples per optimizer step."""
    per_step = world * ds.grad_accum
    if global_batch % per_step:
        raise ValueError(
            f"global batch {global_batch} is not divisible by workers × grad_accum = {per_step}"
        )
    zero: dict[str, Any] = {"stage": ds.stage}
    if ds.stage in (1, 2):
        zero |= {"reduce_bucket_size": ds.bucket_elements,
                 "allgather_bucket_size": ds.bucket_elements}  # fmt: skip
    if ds.stage == 3:
        zero |= {"reduce_bucket_size": ds.bucket_elements,
                 "stage3_prefetch_bucket_size": ds.bucket_elements}  # fmt: skip
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": global_batch // per_step,
        "gradient_accumulation_steps": ds.grad_accum,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16"},
        "zero_allow_untested_optimizer": True,  # our client optimizer is torch's AdamW
        # Offloaded, torch's AdamW steps on the CPU; DeepSpeed would insist on its own CPU
        # Adam, a C++ op compiled at start-up (a compiler on every node, minutes per start).
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,  # we log ourselves
    }


# --- the training job's config ----------------------------------------------------------


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
    # Where workers keep those features for later runs of the same weights (a sweep's trials,
    # a fine-tune): a folder on each node, "" for none. Default: text-features/ in the cache
    # root (storage.cache_root: $MMRAY_CACHE or ~/.cache/mmray).
    text_cache_dir: str = dataclasses.field(
        default_factory=lambda: f"{storage.cache_root()}/text-features"
    )
    # A worker that gets no batch for this long stops the run with a diagnosis (0: waits
    # forever). Covers Ray Data's start-up, so it is generous.
    stall_timeout_s: float = 300.0
    # Batches drawn as the seed decides, each image's crop a function of (schedule.seed, its key):
    # the same config and seed give the same loss curve (with one worker; several take the
    # split's blocks as they ask). Crops then repeat every epoch, and the read keeps order.
    deterministic: bool = False
    # Shards that take at most this share of the cluster's object store are read (and
    # split) once into it and kept for every epoch, not read again each epoch (0: never).
    # Off by default: it pays where the workers wait for data (docs/BENCHMARKS.md).
    hold_fraction: float = 0.0
    # Each worker draws its batches at random from a buffer of this many prepared rows, and
    # the shard files are read in a new order each epoch (webdataset's shard and sample
    # shuffle; 0: neither). Without it every epoch's batches hold the same rows, so the
    # contrastive loss meets the same negatives every epoch. Each epoch's first batch waits
    # for the buffer to fill: 1000 rows made the tiny config's mean step 17 % slower, 256
    # rows 2 % (docs/BENCHMARKS.md). Memory: a row's pixels, 49 KB at 64 px, 600 KB at 224 px.
    # Under ``deterministic`` the files keep their order and the buffer's draws are a
    # function of (seed, rank, epoch).
    shuffle_buffer: int = 256

    def validate(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise ValueError("data.val_fraction must be in [0, 1)")
        if not 0 <= self.hold_fraction <= 1:
            raise ValueError("data.hold_fraction must be in [0, 1]")
        if self.text_cache < 0 or self.stall_timeout_s < 0 or self.shuffle_buffer < 0:
            raise ValueError(
                "data.text_cache, data.stall_timeout_s and data.shuffle_buffer must be >= 0"
            )


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
    checkpoint_every: int = 100  # steps between checkpoints; 0: at the last step only
    log_every: int = 10
    max_failures: int = 1  # worker-group restarts from the last checkpoint (-1: no limit)
    seed: int = 0

    def validate(self) -> None:
        if min(self.global_batch, self.max_steps, self.log_every) < 1:
            raise ValueError("need global_batch, max_steps and log_every >= 1")
        if self.checkpoint_every < 0 or self.max_failures < -1 or self.seed < 0:
            raise ValueError("need checkpoint_every >= 0, max_failures >= -1 and seed >= 0")


@dataclasses.dataclass(kw_only=True)
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0

    def validate(self) -> None:
        if self.num_workers < 1 or self.cpus_per_worker < 0:
            raise ValueError("need num_workers >= 1 and cpus_per_worker >= 0")


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    init: InitConfig = dataclasses.field(default_factory=InitConfig)  # warm start (init.from)
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
        self.ds_config  # noqa: B018 - built now: a batch that does not split fails here

    def eval_setup(self) -> list[Any]:
        """What this run's evaluation figures depend on (the held-out data and its split, the
        zero-shot folders, the pairs scored): two runs' figures compare only where it is equal."""
        absolute = lambda p: storage.absolute(p) if p else ""  # noqa: E731
        data, evals = self.data, self.eval
        return [absolute(data.path), absolute(data.val_path), data.val_fraction,
                [absolute(f) for f in evals.zeroshot], evals.max_pairs]  # fmt: skip

    @functools.cached_property
    def ds_config(self) -> dict[str, Any]:
        """The DeepSpeed JSON config, built once (workers get it with the config)."""
        return deepspeed_config(
            self.deepspeed, self.optim, self.schedule.global_batch, self.scaling.num_workers
        )


def cosine_lr(step: int, max_steps: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to 0 at ``max_steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's rule: decay weight matrices; not biases, norms, embeddings' gains, scalars."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "norm" in name or "bias" in name or "logit_" in name
        (no_decay if exempt else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class DataStalled(RuntimeError):
    """The data pipeline produced nothing for longer than allowed."""


def within(items: Iterable[T], timeout_s: float, stalled: Callable[[float], str]) -> Iterator[T]:
    """Yield ``items``, drawn one ahead in a helper thread; raise ``DataStalled(stalled(t))``
    when the next one takes longer than ``timeout_s`` (0: wait forever). A loader that can
    never produce (no CPU left for its tasks) then ends the run with a diagnosis instead of
    hanging it."""
    if not timeout_s:
        yield from items
        return
    box: queue.Queue = queue.Queue(maxsize=1)
    end, stop = object(), threading.Event()

    def pump() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        box.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            box.put((end, None))
        except BaseException as e:  # re-raised in the consumer
            box.put((end, e))

    threading.Thread(target=pump, daemon=True, name="mmray-data").start()
    try:
        while True:
            try:
                item, error = box.get(timeout=timeout_s)
            except queue.Empty:
                raise DataStalled(stalled(timeout_s)) from None
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()
