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


@dataclasses.dataclass
class Fused:
    tokens: torch.Tensor | None  # (B, T, W) fused text positions, or None
    pair: torch.Tensor  # (B, W)


def _causal(t: int, device: torch.device) -> torch.Tensor:
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
            mask[n:, n:] = _causal(t, x.device)
        for block in self.blocks:
            x = block(x, full_pad, mask)
        x = self.norm(x)
        return Fused(tokens=x[:, n:], pair=x[:, n])  # pair: the text's first ([CLS]) position


class CrossAttentionFusion(nn.Module):
    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cross=True) for _ in range(cfg.layers)
        )
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, image, text, pad, causal: bool = False) -> Fused:
        mask = _causal(text.shape[1], text.device) if causal else None
        x = text
        for block in self.blocks:
            x = block(x, pad, mask, image=image)
        x = self.norm(x)
        return Fused(tokens=x, pair=x[:, 0])


def _text_summary(text: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Mean of the real text positions: (B, T, W) → (B, W)."""
    keep = (~pad).unsqueeze(-1).to(text.dtype)
    return (text * keep).sum(1) / keep.sum(1).clamp(min=1)


class GatedFusion(nn.Module):
    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.width, cfg.width)
        self.out = nn.Sequential(
            nn.LayerNorm(2 * cfg.width), nn.Linear(2 * cfg.width, cfg.width), nn.GELU()
        )

    def forward(self, image, text, pad, causal: bool = False) -> Fused:
        t = _text_summary(text, pad)  # (B, W)
        gated = torch.sigmoid(self.gate(t)).unsqueeze(1) * image  # (B, N, W)
        return Fused(tokens=None, pair=self.out(torch.cat([gated.mean(1), t], dim=-1)))


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
        t = _text_summary(text, pad)
        gamma, beta = self.film(t).unsqueeze(1).chunk(2, dim=-1)  # (B, 1, W) each
        v = self.mlp((1 + gamma) * self.norm(image) + beta)  # (B, N, W)
        return Fused(tokens=None, pair=self.out(torch.cat([v.mean(1), t], dim=-1)))


# One line per variant. Variants whose module keeps text tokens support MLM and captioning.
FUSIONS: dict[str, type[nn.Module]] = {
    "early": EarlyFusion,
    "cross_attention": CrossAttentionFusion,
    "hybrid": CrossAttentionFusion,
    "gated": GatedFusion,
    "film": FiLMFusion,
}
TOKEN_OBJECTIVES = {"early", "cross_attention", "hybrid"}  # have text tokens: mlm, caption
