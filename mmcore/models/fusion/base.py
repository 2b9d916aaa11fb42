"""Fusion modules: image tokens + text tokens → fused text tokens and a pair vector.

Every module maps ``image`` (B, N, W) and ``text`` (B, T, W) (both already projected to the
fusion width W) with ``pad`` (B, T), True at padding, to a ``Fused``: ``tokens`` (B, T, W),
the text positions after fusion (None when the module does not keep them), and ``pair``
(B, W), the vector the image-text-matching head reads. ``causal=True`` masks each text
position from later ones (captioning); image tokens are always fully visible.

  early            single stream: [image; text] through one transformer (ViLT/VisualBERT)
  cross_attention  text self-attention + cross-attention to image patches (ALBEF/BLIP)
  gated            image patches gated by a sigmoid of the text, pooled (no text tokens)
  film             image patches modulated by text-predicted scale and shift (FiLM)
``hybrid`` uses the cross_attention module and adds contrastive training with hard negatives.
Cost: a fusion model scores a pair with a forward pass of the fusion module, so ranking N
images against M texts costs N·M passes; ``pair_scores`` re-ranks an ITC shortlist instead.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn


@dataclasses.dataclass(kw_only=True)
class FusionConfig:
    width: int = 128  # W
    layers: int = 2
    heads: int = 4

    def validate(self) -> None:
        if min(self.width, self.layers, self.heads) < 1 or self.width % self.heads:
            raise ValueError("need width, layers, heads >= 1 and width divisible by heads")


@dataclasses.dataclass
class Fused:
    tokens: torch.Tensor | None  # (B, T, W) fused text positions, or None
    pair: torch.Tensor  # (B, W)


def causal_mask(t: int, device: torch.device) -> torch.Tensor:
    """(T, T) True above the diagonal: position i may not attend to j > i."""
    return torch.ones(t, t, dtype=torch.bool, device=device).triu(1)


class Block(nn.Module):
    """Pre-norm transformer block, with optional cross-attention to image tokens."""

    def __init__(self, width: int, heads: int, cross: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross = nn.MultiheadAttention(width, heads, batch_first=True) if cross else None
        self.norm_cross = nn.LayerNorm(width) if cross else None
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x, pad, attn_mask=None, image=None) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, key_padding_mask=pad, attn_mask=attn_mask, need_weights=False)[0]
        if self.cross is not None:
            h = self.norm_cross(x)
            x = x + self.cross(h, image, image, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def text_summary(text: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Mean of the real text positions: (B, T, W) → (B, W)."""
    keep = (~pad).unsqueeze(-1).to(text.dtype)
    return (text * keep).sum(1) / keep.sum(1).clamp(min=1)
