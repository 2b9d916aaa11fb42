"""Gated fusion: image patches gated by a sigmoid of the text summary, then pooled."""

from __future__ import annotations

import torch
from torch import nn

from mmcore.models.fusion.base import Fused, FusionConfig, text_summary


class GatedFusion(nn.Module):
    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.width, cfg.width)
        self.out = nn.Sequential(
            nn.LayerNorm(2 * cfg.width), nn.Linear(2 * cfg.width, cfg.width), nn.GELU()
        )

    def forward(self, image, text, pad, causal: bool = False) -> Fused:
        t = text_summary(text, pad)  # (B, W)
        gated = torch.sigmoid(self.gate(t)).unsqueeze(1) * image  # (B, N, W)
        return Fused(tokens=None, pair=self.out(torch.cat([gated.mean(1), t], dim=-1)))
