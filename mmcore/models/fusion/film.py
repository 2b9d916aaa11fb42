"""FiLM fusion: image patches modulated by a text-predicted scale and shift."""

from __future__ import annotations

import torch
from torch import nn

from mmcore.models.fusion.base import Fused, FusionConfig, text_summary


class FiLMFusion(nn.Module):
    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.film = nn.Linear(cfg.width, 2 * cfg.width)
        self.norm = nn.LayerNorm(cfg.width)
        self.mlp = nn.Sequential(nn.Linear(cfg.width, cfg.width), nn.GELU())
        self.out = nn.Sequential(
            nn.LayerNorm(2 * cfg.width), nn.Linear(2 * cfg.width, cfg.width), nn.GELU()
        )

    def forward(self, image, text, pad, causal: bool = False) -> Fused:
        t = text_summary(text, pad)
        gamma, beta = self.film(t).unsqueeze(1).chunk(2, dim=-1)  # (B, 1, W) each
        v = self.mlp((1 + gamma) * self.norm(image) + beta)  # (B, N, W)
        return Fused(tokens=None, pair=self.out(torch.cat([v.mean(1), t], dim=-1)))
