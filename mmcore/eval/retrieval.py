"""Image↔text retrieval Recall@K over paired data (pair i is image i with text i)."""

from __future__ import annotations

import torch


def recall_at_k(scores: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """scores (N, N), image i against text j → ``i2t_r@k`` and ``t2i_r@k``.

    The rank of the true partner counts every candidate scoring strictly higher, so ties
    favour the model; with N < k every query trivially succeeds.
    """
    true = scores.diagonal()
    rank_i2t = (scores > true[:, None]).sum(1)  # texts above each image's own caption
    rank_t2i = (scores > true[None, :]).sum(0)  # images above each caption's own image
    out = {}
    for k in ks:
        out[f"i2t_r@{k}"] = (rank_i2t < k).float().mean().item()
        out[f"t2i_r@{k}"] = (rank_t2i < k).float().mean().item()
    return out
