"""The image-text model: towers, projections, a temperature, and a fusion variant.

    model = build_model(ModelConfig(fusion="late"))
    out = model(pixels, input_ids, attention_mask)     # ModelOutput: embeddings + scales
    img = model.encode_image(pixels)                    # (B, E), unit norm
    txt = model.encode_text(input_ids, attention_mask)  # (B, E), unit norm

``late`` is the dual encoder (CLIP): the towers never see each other, a pair's score is the
cosine similarity of its embeddings, and retrieval is one matrix product.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmcore.models.towers import TextConfig, TextTower, VisionConfig, VisionTower

MAX_LOGIT_SCALE = 100.0  # CLIP clamps the learnt temperature at 1/100


@dataclasses.dataclass(kw_only=True)
class ModelConfig:
    fusion: Literal["late"] = "late"  # the variant; more come with their modules
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    embed_dim: int = 128  # shared embedding size
    init_temperature: float = 0.07  # CLIP's; logit scale starts at 1/0.07
    init_bias: float = -10.0  # SigLIP's logit bias at start

    def validate(self) -> None:
        if self.embed_dim < 1 or not 0 < self.init_temperature <= 1:
            raise ValueError("need embed_dim >= 1 and 0 < init_temperature <= 1")


@dataclasses.dataclass
class ModelOutput:
    image_embeds: torch.Tensor  # (B, E), unit norm
    text_embeds: torch.Tensor  # (B, E), unit norm
    logit_scale: torch.Tensor  # (), exp of the learnt log scale, at most 100
    logit_bias: torch.Tensor  # (), SigLIP's learnt bias


class ImageTextModel(nn.Module):
    """Dual encoder. Scalars are shape-(1,) parameters: DeepSpeed's initial broadcast fails on
    0-dim ones (see STACK.md); ``logit_scale``/``logit_bias`` in the output are 0-dim."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision)
        self.text = TextTower(cfg.text)
        self.visual_projection = nn.Linear(self.vision.width, cfg.embed_dim, bias=False)
        self.text_projection = nn.Linear(self.text.width, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / cfg.init_temperature)))
        self.logit_bias = nn.Parameter(torch.full((1,), cfg.init_bias))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W) → (B, E), unit norm."""
        _, pooled = self.vision(pixels)
        return F.normalize(self.visual_projection(pooled), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """ids, mask (B, T) → (B, E), unit norm."""
        _, pooled = self.text(input_ids, attention_mask)
        return F.normalize(self.text_projection(pooled), dim=-1)

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)[0], self.logit_bias[0]

    def forward(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> ModelOutput:
        scale, bias = self.scales()
        return ModelOutput(
            image_embeds=self.encode_image(pixels),
            text_embeds=self.encode_text(input_ids, attention_mask),
            logit_scale=scale,
            logit_bias=bias,
        )

    @torch.no_grad()
    def similarity(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Pair scores (N_images, N_texts): cosine similarity times the logit scale."""
        return self.scales()[0] * image_embeds @ text_embeds.T


def build_model(cfg: ModelConfig) -> ImageTextModel:
    match cfg.fusion:
        case "late":
            return ImageTextModel(cfg)
