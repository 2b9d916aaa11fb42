"""Fusion variants: one file each, one line each in ``FUSIONS`` (see ``base.py``)."""

from __future__ import annotations

from torch import nn

from mmcore.models.fusion.base import Fused, FusionConfig
from mmcore.models.fusion.cross_attention import CrossAttentionFusion
from mmcore.models.fusion.early import EarlyFusion
from mmcore.models.fusion.film import FiLMFusion
from mmcore.models.fusion.gated import GatedFusion

FUSIONS: dict[str, type[nn.Module]] = {
    "early": EarlyFusion,
    "cross_attention": CrossAttentionFusion,
    "hybrid": CrossAttentionFusion,  # + contrastive training and ITC shortlists (model.py)
    "gated": GatedFusion,
    "film": FiLMFusion,
}

__all__ = ["FUSIONS", "Fused", "FusionConfig"]
