"""Early fusion: one transformer over [image tokens; text tokens] (ViLT/VisualBERT)."""

from __future__ import annotations

import torch
from torch import nn

from mmcore.models.fusion.base import Block, Fused, FusionConfig, causal_mask


class EarlyFusion(nn.Module):
    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.modality = nn.Parameter(torch.zeros(2, cfg.width))  # type embeddings
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cross=False) for _ in range(cfg.layers)
        )
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, image, text, pad, causal: bool = False) -> Fused:
        n, t = image.shape[1], text.shape[1]
        x = torch.cat([image + self.modality[0], text + self.modality[1]], dim=1)  # (B, N+T, W)
        full_pad = torch.cat([torch.zeros_like(pad[:, :1]).expand(-1, n), pad], dim=1)
        mask = None
        if causal:  # prefix LM: image visible to all, text causal, image never sees text
            mask = torch.zeros(n + t, n + t, dtype=torch.bool, device=x.device)
            mask[:n, n:] = True
            mask[n:, n:] = causal_mask(t, x.device)
        for block in self.blocks:
            x = block(x, full_pad, mask)
        x = self.norm(x)
        return Fused(tokens=x[:, n:], pair=x[:, n])  # pair: the text's first ([CLS]) position
