"""Losses against hand-written loops, and the distributed forms in two real processes."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mmcore.losses.contrastive import clip_loss, combine, siglip_loss
from pipelines.local import free_port


def features(n: int = 6, e: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, e, generator=g), dim=-1),
            F.normalize(torch.randn(n, e, generator=g), dim=-1))  # fmt: skip


def clip_reference(img: torch.Tensor, txt: torch.Tensor, scale: float) -> float:
    n, total = len(img), 0.0
    for i in range(n):  # image i against every text, then text i against every image
        for a, b in ((img, txt), (txt, img)):
            logits = [scale * float(a[i] @ b[j]) for j in range(n)]
            total += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    return total / (2 * n)


def siglip_reference(img: torch.Tensor, txt: torch.Tensor, scale: float, bias: float) -> float:
    n, total = len(img), 0.0
    for i in range(n):
        for j in range(n):
            z = (1 if i == j else -1) * (scale * float(img[i] @ txt[j]) + bias)
            total += math.log(1 + math.exp(-z))
    return total / n


def test_losses_match_reference_loops() -> None:
    img, txt = features()
    got = clip_loss(img, txt, torch.tensor(10.0))["clip"].item()
    assert got == pytest.approx(clip_reference(img, txt, 10.0), rel=1e-5)
    got = siglip_loss(img, txt, torch.tensor(10.0), torch.tensor(-3.0))["siglip"].item()
    assert got == pytest.approx(siglip_reference(img, txt, 10.0, -3.0), rel=1e-5)


def test_gradients_reach_features_and_scales() -> None:
    img, txt = (t.clone().requires_grad_() for t in features())
    scale, bias = torch.tensor(5.0, requires_grad=True), torch.tensor(-1.0, requires_grad=True)
    loss = combine({**clip_loss(img, txt, scale), **siglip_loss(img, txt, scale, bias)},
                   {"clip": 1.0, "siglip": 0.5})  # fmt: skip
    loss.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (img, txt, scale, bias))
    with pytest.raises(KeyError, match="itm"):
        combine({"clip": loss}, {"clip": 1.0, "itm": 1.0})


def _worker(rank: int, world: int, port: int, queue: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    img, txt = features(8, 8)  # the same global batch everywhere; each rank takes its rows
    rows = slice(rank * 4, rank * 4 + 4)
    local_img, local_txt = img[rows].clone().requires_grad_(), txt[rows].clone().requires_grad_()
    scale, bias = torch.tensor(7.0), torch.tensor(-2.0)
    clip = clip_loss(local_img, local_txt, scale)["clip"]
    sig = siglip_loss(local_img, local_txt, scale, bias)["siglip"]
    (clip + sig).backward()
    losses = torch.stack([clip.detach(), sig.detach()])
    dist.all_reduce(losses)
    # numpy, not tensors: a tensor crosses the queue as shared memory, which vanished when
    # this process exited before the parent read it (FileNotFoundError, now and then)
    grads = [(g / world).numpy() for g in (local_img.grad, local_txt.grad)]
    queue.put((rank, (losses / world).tolist(), *grads))
    dist.destroy_process_group()


def test_distributed_losses_equal_single_process_on_the_global_batch() -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    img, txt = (t.clone().requires_grad_() for t in features(8, 8))
    scale, bias = torch.tensor(7.0), torch.tensor(-2.0)
    clip = clip_loss(img, txt, scale)["clip"]
    sig = siglip_loss(img, txt, scale, bias)["siglip"]
    (clip + sig).backward()
    for rank, (dist_clip, dist_sig), grad_img, grad_txt in results:
        assert dist_clip == pytest.approx(clip.item(), rel=1e-5)
        assert dist_sig == pytest.approx(sig.item(), rel=1e-5)
        rows = slice(rank * 4, rank * 4 + 4)
        torch.testing.assert_close(torch.from_numpy(grad_img), img.grad[rows], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(torch.from_numpy(grad_txt), txt.grad[rows], rtol=1e-4, atol=1e-6)
