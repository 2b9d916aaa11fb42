"""Cross-attention fusion: text self-attention + cross-attention to image patches (ALBEF/BLIP)."""

from __future__ import annotations

from torch import nn

from mmcore.models.fusion.base import Block, Fused, FusionConfig, causal_mask


class CrossAttentionFusion(nn.Module):
    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cross=True) for _ in range(cfg.layers)
        )
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, image, text, pad, causal: bool = False) -> Fused:
        mask = causal_mask(text.shape[1], text.device) if causal else None
        x = text
        for block in self.blocks:
            x = block(x, pad, mask, image=image)
        x = self.norm(x)
        return Fused(tokens=x, pair=x[:, 0])
