"""Contrastive losses over the global batch: CLIP InfoNCE and SigLIP, single- or multi-process.

With ``torch.distributed`` initialised, features are all-gathered WITH gradient and each rank
computes only its own rows of the logit matrix (open_clip's ``local_loss``): O(B·W·B) logits
per rank instead of O((W·B)²). The mean over ranks of the per-rank losses equals the loss of
one process on the whole global batch, and (with gradients averaged over ranks, as DDP and
DeepSpeed do) so do the gradients. Each function returns a dict of named terms.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, E) on each rank → (W·B, E) in rank order; gradients flow back to every rank."""
    _, world = _world()
    if world == 1:
        return x
    with warnings.catch_warnings():
        # torch 2.13 deprecates this autograd all_gather (and the collective under it) in
        # favour of private functional collectives; it works, and its FutureWarning came
        # back at every step (other code resets the warnings registry): ~200 log lines a run.
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(dist_fn.all_gather(x), dim=0)


def clip_loss(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Symmetric InfoNCE. image, text (B, E) unit norm (this rank's part); logit_scale ()."""
    rank, _ = _world()
    all_image, all_text = gather_with_grad(image), gather_with_grad(text)
    logits_per_image = logit_scale * image @ all_text.T  # (B, W·B)
    logits_per_text = logit_scale * text @ all_image.T  # (B, W·B)
    labels = torch.arange(len(image), device=image.device) + rank * len(image)
    loss = (
        F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)
    ) / 2
    return {"clip": loss}


def siglip_loss(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Sigmoid loss: every pair is a binary match/no-match; bias () is learnt.

    Normalised per image as in the SigLIP paper: -sum(log σ(±logits)) / global batch size.
    """
    rank, world = _world()
    all_text = gather_with_grad(text)
    logits = logit_scale * image @ all_text.T + logit_bias  # (B, W·B)
    labels = -torch.ones_like(logits)
    idx = torch.arange(len(image), device=image.device)
    labels[idx, idx + rank * len(image)] = 1.0
    # Each rank holds B of the W·B image rows; scaling by 1/B makes the mean over ranks the
    # single-process loss -sum / (W·B).
    return {"siglip": -F.logsigmoid(labels * logits).sum() / len(image)}


def combine(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Weighted sum of named loss terms (``loss.terms: {clip: 1.0, itm: 1.0}``)."""
    missing = set(weights) - set(terms)
    if missing:
        raise KeyError(f"loss terms {sorted(missing)} were not computed")
    return sum(w * terms[name] for name, w in weights.items())
