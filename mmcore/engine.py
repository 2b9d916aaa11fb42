"""The DeepSpeed side of training, without Ray: the engine a worker trains, one step, and
full weights back from a checkpoint of every rank's files.

    engine, sched = build_engine(cfg)            # the same initial weights on every rank
    metrics = train_step(engine, sched, batch, cfg, generator, pending=[])  # None mid-window
    engine.save_checkpoint(folder, tag=CHECKPOINT_TAG)
    model = consolidate(folder, build_model(cfg.model), cfg.deepspeed.stage)  # fp32
    metrics = Evaluator(cfg, rank, val)(engine)   # eval/*, on rank 0; every rank calls it
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mmcore.eval.run import eval_metrics
from mmcore.inference import trim_batch
from mmcore.losses.fusion import AnswerPrior, compute_losses
from mmcore.models.model import build_model
from mmcore.models.towers import TextMemo
from mmcore.models.variants import trains_decoder
from mmcore.training import TrainConfig, cosine_lr, param_groups

log = logging.getLogger(__name__)
# The DeepSpeed checkpoint tag (not "latest": DeepSpeed writes a file of that name).
CHECKPOINT_TAG = "ckpt"


def build_engine(cfg: TrainConfig, init: dict[str, torch.Tensor] | None = None) -> tuple[Any, Any]:
    """The DeepSpeed engine (identical initial weights on every rank: seeded, then the warm
    start's tensors ``init`` loaded over them) and its LR schedule; the text tower's feature
    memo when ``data.text_cache`` asks for one."""
    if not cfg.scaling.use_gpu:  # what DeepSpeed would find, after a warning that it did
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops
    import ninja

    # DeepSpeed compiles its CPU communication op with the first `ninja` on PATH. Ninja 1.12+
    # hashes build commands differently from older ones, so a worker started from a shell
    # with the venv on PATH and one without (the system's ninja) recompiled the op in turn,
    # about 75 s on 2 cores each time. Always the ninja installed beside the packages.
    path = os.environ.get("PATH", "")
    if not path.startswith(ninja.BIN_DIR + os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
    # DeepSpeed builds its CPU shared-memory all-reduce op when it starts its communication
    # backend: ~45-75 s of compiling on a fresh 2-core machine. Only inference's
    # tensor-parallel all-reduce uses it; training's collectives are torch.distributed's
    # (gloo, nccl). Marked incompatible here, it is not built (deepspeed.comm.torch).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    torch.manual_seed(cfg.schedule.seed)
    model = build_model(cfg.model)
    if init:
        model.load_state_dict(init, strict=False)  # mmcore.warmstart.plan chose the keys
    opt = torch.optim.AdamW(
        param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
    )  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_lr(s, cfg.schedule.max_steps, cfg.optim.warmup_steps)
    )
    engine, _, _, sched = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=cfg.ds_config
    )
    say = engine.global_rank == 0  # one line a job, not one a rank
    if cfg.loss.vqa_debias:
        engine.module.answer_prior = AnswerPrior()
    if cfg.data.text_cache and cfg.deepspeed.stage == 3:
        if say:
            log.warning("data.text_cache is off under ZeRO-3: every rank runs the text tower")
    elif cfg.data.text_cache:
        folder = os.path.expanduser(cfg.data.text_cache_dir) if cfg.data.text_cache_dir else None
        memo = engine.module.text_memo = TextMemo(engine.module.text, cfg.data.text_cache, folder)
        if memo.loaded and say:
            log.info("text features of %d captions from %s", memo.loaded, memo.folder)
    return engine, sched


def train_step(
    engine: Any, sched: Any, batch: dict[str, torch.Tensor], cfg: TrainConfig,
    generator: torch.Generator, pending: list[dict[str, float]],
) -> dict[str, float] | None:  # fmt: skip
    """Forward and backward on one micro-batch, and the optimizer step when it closes a
    gradient-accumulation window: then that step's metrics (loss terms averaged over the
    window's micro-batches, kept in ``pending`` meanwhile), else None."""
    # Asked before step(): afterwards DeepSpeed already answers for the next micro-batch.
    boundary = engine.is_gradient_accumulation_boundary()
    total, terms = compute_losses(engine.module, trim_batch(batch), cfg.loss.terms, generator)
    engine.backward(total)
    engine.step()
    pending.append(
        {f"train/{k}": v.item() for k, v in terms.items()} | {"train/loss": total.item()}
    )
    if not boundary:
        return None
    losses = {k: sum(p[k] for p in pending) / len(pending) for k in pending[0]}
    pending.clear()
    return losses | {
        "train/lr": sched.get_last_lr()[0],
        "train/logit_scale": engine.module.scales()[0].item(),
        "train/grad_norm": float(engine.get_global_grad_norm() or 0.0),
        "train/samples_seen": engine.global_steps * cfg.schedule.global_batch,
    }


def consolidate(checkpoint_dir: Path, model: torch.nn.Module, stage: int) -> torch.nn.Module:
    """Load full fp32 weights into ``model`` from a checkpoint folder of every rank's DeepSpeed
    files (saved under tag ``CHECKPOINT_TAG`` at ZeRO ``stage``)."""
    if stage == 0:  # plain data parallel: rank 0 holds the whole model
        files = sorted((checkpoint_dir / CHECKPOINT_TAG).glob("mp_rank_00_model_states.pt"))
        state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the tensors load on the CPU (no warning)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # a dozen lines of its progress on stdout, its tqdm bars on stderr
        with contextlib.redirect_stdout(io.StringIO()) as said, contextlib.redirect_stderr(said):
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), CHECKPOINT_TAG)
        log.debug("%s", said.getvalue())
    model.load_state_dict(state, strict=True)
    return model.eval()


class Evaluator:
    """Evaluation during training: rank 0 scores a plain copy of the current weights
    (zero-shot folders; retrieval over the first ``eval.max_pairs`` validation pairs, which
    ``val()`` returns as a batch). Every rank must call it: under ZeRO-3 the partitioned
    weights are gathered collectively first."""

    def __init__(self, cfg: TrainConfig, rank: int, val: Callable[[], dict] | None) -> None:
        self.cfg, self.load_val = cfg, val
        self.model = build_model(cfg.model).eval() if rank == 0 else None
        self.val: dict[str, torch.Tensor] | None = None

    def __call__(self, engine: Any) -> dict[str, float]:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            if self.model is not None:
                self.model.load_state_dict(engine.module.state_dict())
        if self.model is None:
            return {}
        if self.val is None and self.load_val is not None:  # read once, kept
            self.val = trim_batch(self.load_val())
        generative = trains_decoder(self.cfg.model.fusion, self.cfg.loss.terms)
        metrics = eval_metrics(self.model, self.cfg.eval.zeroshot, self.val, generative)
        return {f"eval/{k}": v for k, v in metrics.items()}
