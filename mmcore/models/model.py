"""The image-text model: towers, projections, a temperature, and a fusion variant.

    model = build_model(ModelConfig(fusion="late"))
    out = model(pixels, input_ids, attention_mask)     # ModelOutput: embeddings, tokens, scales
    img = model.encode_image(pixels)                    # (B, E), unit norm
    txt = model.encode_text(input_ids, attention_mask)  # (B, E), unit norm

Every variant has the two towers and their contrastive (ITC) projections. ``late`` is the
dual encoder (CLIP): a pair's score is the cosine similarity and retrieval is one matrix
product. The other variants add a fusion module (``fusion.py``) with an image-text-matching
head, and, where the module keeps text tokens, a language-model head for MLM and captioning.
``variants.py`` lists what each variant can do and the loss terms it trains.

Scoring cost: ``late`` ranks N images against M texts with one (N, M) matrix product. A pure
fusion variant needs a fusion pass per pair, N·M passes; ``hybrid`` re-ranks only the ITC
top-k of each image, N·k passes (``pair_scores(..., shortlist=k)``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mmcore.models.fusion import FUSIONS, Fused, FusionConfig
from mmcore.models.towers import (
    TextConfig,
    TextMemo,
    TextTower,
    VisionConfig,
    VisionTower,
    tokenizer,
)
from mmcore.models.variants import VARIANTS, Fusion

MAX_LOGIT_SCALE = 100.0  # CLIP clamps the learnt temperature at 1/100


@dataclasses.dataclass(kw_only=True)
class ModelConfig:
    fusion: Fusion = "late"
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    fusion_module: FusionConfig = dataclasses.field(default_factory=FusionConfig)
    embed_dim: int = 128  # shared contrastive embedding size
    init_temperature: float = 0.07  # CLIP's; logit scale starts at 1/0.07
    init_bias: float = -10.0  # SigLIP's logit bias at start

    def validate(self) -> None:
        if self.embed_dim < 1 or not 0 < self.init_temperature <= 1:
            raise ValueError("need embed_dim >= 1 and 0 < init_temperature <= 1")


class ModelOutput(NamedTuple):  # a tuple: ZeRO-3's module hooks find the tensors in it
    image_embeds: torch.Tensor  # (B, E), unit norm
    text_embeds: torch.Tensor  # (B, E), unit norm
    image_tokens: torch.Tensor  # (B, N, Dv) vision tower output
    text_tokens: torch.Tensor  # (B, T, Dt) text tower output
    logit_scale: torch.Tensor  # (), exp of the learnt log scale, at most 100
    logit_bias: torch.Tensor  # (), SigLIP's learnt bias


class ImageTextModel(nn.Module):
    """Scalars are shape-(1,) parameters: DeepSpeed's initial broadcast fails on 0-dim ones
    ("self.dim() cannot be 0 to view Float as Byte"); ``logit_scale``/``logit_bias`` in the
    output are 0-dim, and the Hugging Face export reshapes them back."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        variant = VARIANTS[cfg.fusion]
        self.has_itc, self.scores_pairs, self.generates = (
            variant.has_itc,
            variant.scores_pairs,
            variant.generates,
        )
        self.vision = VisionTower(cfg.vision)
        self.text = TextTower(cfg.text)
        self.text_memo: TextMemo | None = None  # training's per-caption features (TextMemo)
        self.answer_prior = None  # training's AnswerPrior (loss.vqa_debias), else None
        # The loss terms it was trained on, when known (training's export records them):
        # a decoder trained for captions only cannot answer questions, and the reverse.
        self.objectives: frozenset[str] | None = None
        self.visual_projection = nn.Linear(self.vision.width, cfg.embed_dim, bias=False)
        self.text_projection = nn.Linear(self.text.width, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / cfg.init_temperature)))
        self.logit_bias = nn.Parameter(torch.full((1,), cfg.init_bias))
        if self.scores_pairs:
            width = cfg.fusion_module.width
            self.image_to_fusion = nn.Linear(self.vision.width, width)
            self.text_to_fusion = nn.Linear(self.text.width, width)
            self.fusion = FUSIONS[cfg.fusion](cfg.fusion_module)
            self.itm_head = nn.Linear(width, 2)
        if self.generates:
            self.lm_head = nn.Linear(cfg.fusion_module.width, tokenizer().vocab_size)
            self.positions = nn.Parameter(
                torch.zeros(cfg.text.context_length, cfg.fusion_module.width)
            )

    # --- contrastive (every variant) ------------------------------------------------------

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W) → (B, E), unit norm."""
        return F.normalize(self.visual_projection(self.vision(pixels)[1]), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """ids, mask (B, T) → (B, E), unit norm."""
        return F.normalize(self.text_projection(self.text(input_ids, attention_mask)[1]), dim=-1)

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)[0], self.logit_bias[0]

    def forward(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> ModelOutput:
        image_tokens, image_pooled = self.vision(pixels)
        text = self.text if self.text_memo is None else self.text_memo
        text_tokens, text_pooled = text(input_ids, attention_mask)
        scale, bias = self.scales()
        return ModelOutput(
            image_embeds=F.normalize(self.visual_projection(image_pooled), dim=-1),
            text_embeds=F.normalize(self.text_projection(text_pooled), dim=-1),
            image_tokens=image_tokens,
            text_tokens=text_tokens,
            logit_scale=scale,
            logit_bias=bias,
        )

    # --- fusion (every variant but late) --------------------------------------------------

    def fuse(
        self, image_tokens: torch.Tensor, text: torch.Tensor, attention_mask: torch.Tensor,
        causal: bool = False,
    ) -> Fused:  # fmt: skip
        """Image tower tokens (B, N, Dv) and text (B, T, Dt) → fused text tokens and pair vector
        (width W). ``causal``: ``text`` is context-free embeddings, positions are added here."""
        text = self.text_to_fusion(text)
        if causal:
            text = text + self.positions[: text.shape[1]]
        return self.fusion(self.image_to_fusion(image_tokens), text, attention_mask == 0, causal)

    def itm_logits(self, image_tokens, text_tokens, attention_mask) -> torch.Tensor:
        """(B, 2): no-match / match logits for each (image, text) pair."""
        return self.itm_head(self.fuse(image_tokens, text_tokens, attention_mask).pair)

    def mlm_logits(self, image_tokens, text_tokens, attention_mask) -> torch.Tensor:
        """(B, T, V) token logits at every fused text position."""
        return self.lm_head(self.fuse(image_tokens, text_tokens, attention_mask).tokens)

    def decoder_states(self, image_tokens, input_ids, attention_mask) -> torch.Tensor:
        """(B, T, W) the last states of an image-grounded causal decoder; ``lm_head`` maps a
        position's state to its next-token logits. Its input is the context-free token
        embeddings, so no position sees a later token."""
        embeds = self.text.embed(input_ids)
        return self.fuse(image_tokens, embeds, attention_mask, causal=True).tokens

    def caption_logits(self, image_tokens, input_ids, attention_mask) -> torch.Tensor:
        """(B, T, V) next-token logits at every position. The vocabulary projection costs
        several times the decoder at this width: where only some positions are needed, map
        their ``decoder_states`` alone."""
        return self.lm_head(self.decoder_states(image_tokens, input_ids, attention_mask))

    @torch.no_grad()
    def pair_scores(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        shortlist: int | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """(N_images, N_texts) scores. late: scaled cosine. Fusion variants: the ITM match
        log-probability of every pair, or (hybrid, ``shortlist=k``) of the k best texts per
        image by ITC, -inf elsewhere: N·k fusion passes instead of N·M."""
        out = self(pixels, input_ids, attention_mask)
        itc = out.logit_scale * out.image_embeds @ out.text_embeds.T
        if not self.scores_pairs:
            return itc
        if shortlist is not None and not self.has_itc:
            raise ValueError(f"{self.cfg.fusion!r} has no trained ITC embeddings to shortlist by")
        k = itc.shape[1] if shortlist is None else min(shortlist, itc.shape[1])
        candidates = itc.topk(k, dim=1).indices  # (N, k)
        scores = torch.full_like(itc, float("-inf"))
        for i, cols in enumerate(candidates):
            image = out.image_tokens[i : i + 1].expand(len(cols), -1, -1)
            logits = self.itm_logits(image, out.text_tokens[cols], attention_mask[cols])
            scores[i, cols] = logits.log_softmax(-1)[:, 1]
        return scores


def build_model(cfg: ModelConfig) -> ImageTextModel:
    return ImageTextModel(cfg)
