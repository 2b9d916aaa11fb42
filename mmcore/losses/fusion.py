"""Losses on the fusion module (image-text matching, masked LM, captioning, VQA) and the loss
registry: every term is a function plus a thin module with one call signature,
``module(model, out, batch, generator) -> {name: loss}`` (``batch``: ``pixels``,
``input_ids``, ``attention_mask``, and ``qa_ids``/``qa_mask`` for VQA).
``compute_losses`` runs the model once and adds the requested terms
(``loss.terms: {clip: 1.0, itm: 1.0}``); ``LossConfig.check`` refuses, once, terms that the
variant cannot train.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from mmcore.losses.contrastive import clip_loss, combine, siglip_loss
from mmcore.models.model import ImageTextModel, ModelOutput
from mmcore.models.towers import tokenizer
from mmcore.models.variants import ITC, VARIANTS


@dataclasses.dataclass(kw_only=True)
class LossConfig:
    """``loss.terms``: the weighted sum of named terms that training minimises."""

    terms: dict[str, float] = dataclasses.field(default_factory=lambda: {"clip": 1.0})
    # vqa: train the decoder as a product of experts with each question's answer prior
    # (AnswerPrior), so it does not learn what the question alone predicts
    vqa_debias: bool = False

    def validate(self) -> None:
        unknown = sorted(set(self.terms) - set(LOSSES))
        if unknown or not self.terms:
            raise ValueError(f"terms must be a non-empty subset of {list(LOSSES)}; got {unknown}")
        if any(w < 0 for w in self.terms.values()):
            raise ValueError("loss weights must be >= 0")
        if self.vqa_debias and "vqa" not in self.terms:
            raise ValueError("vqa_debias debiases the vqa term: add vqa to loss.terms")

    def check(self, fusion: str) -> None:
        """Refuse terms the model variant cannot train (before any work starts)."""
        check_objectives(fusion, self.terms)


def check_objectives(fusion: str, terms: dict[str, float]) -> None:
    """Raise ValueError when ``fusion`` cannot train one of ``terms``."""
    variant = VARIANTS[fusion]
    unsupported = sorted(set(terms) - variant.objectives)
    if unsupported:
        raise ValueError(
            f"fusion {fusion!r} does not support loss term(s) {unsupported}; "
            f"it supports {sorted(variant.objectives)}"
        )
    if variant.has_itc and not ITC & set(terms):  # hybrid: it ranks by ITC, then matches
        raise ValueError(f"fusion {fusion!r} contrasts first: include a clip or siglip term")


def itm_loss(
    model: ImageTextModel, out: ModelOutput, attention_mask: torch.Tensor,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """ALBEF's ITM: each positive pair plus one negative text per image and one negative
    image per text (B >= 2). Variants trained with ITC draw hard negatives, with probability
    softmax(ITC similarity); the others draw uniformly (their projections are untrained)."""
    b = len(out.image_embeds)
    if b < 2:
        raise ValueError("itm needs a batch of at least 2 pairs to draw negatives")
    with torch.no_grad():
        sim = out.image_embeds @ out.text_embeds.T * out.logit_scale  # (B, B)
        if not model.has_itc:
            sim = torch.zeros_like(sim)  # uniform
        no_self = torch.eye(b, dtype=torch.bool, device=sim.device)
        weights = sim.float().softmax(1).masked_fill(no_self, 0) + 1e-9 * ~no_self
        neg_text = torch.multinomial(weights, 1, generator=generator).squeeze(1)  # (B,)
        weights = sim.T.float().softmax(1).masked_fill(no_self, 0) + 1e-9 * ~no_self
        neg_image = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    images = torch.cat([out.image_tokens, out.image_tokens, out.image_tokens[neg_image]])
    texts = torch.cat([out.text_tokens, out.text_tokens[neg_text], out.text_tokens])
    masks = torch.cat([attention_mask, attention_mask[neg_text], attention_mask])
    labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(images.device)
    return {"itm": F.cross_entropy(model.itm_logits(images, texts, masks), labels)}


def mask_tokens(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """BERT masking: ``prob`` of the real, non-special tokens become targets (at least one
    per row); of those 80 % → [MASK], 10 % → a random token, 10 % unchanged.
    Returns (masked ids, labels with -100 where there is no target)."""
    tok = tokenizer()
    special = torch.isin(input_ids, torch.tensor(tok.all_special_ids)) | (attention_mask == 0)
    noise = torch.rand(input_ids.shape, generator=generator).masked_fill(special, 2.0)
    target = noise < prob
    target[torch.arange(len(noise)), noise.argmin(1)] |= ~special.all(1)  # one per row
    labels = input_ids.masked_fill(~target, -100)
    roll = torch.rand(input_ids.shape, generator=generator)
    random_ids = torch.randint(len(tok), input_ids.shape, generator=generator)
    masked = torch.where(target & (roll < 0.8), tok.mask_token_id, input_ids)
    masked = torch.where(target & (roll >= 0.8) & (roll < 0.9), random_ids, masked)
    return masked, labels


def mlm_loss(
    model: ImageTextModel, out: ModelOutput, input_ids: torch.Tensor,
    attention_mask: torch.Tensor, generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Masked language modelling through the fusion module (the text tower sees the masks)."""
    masked, labels = mask_tokens(input_ids, attention_mask, generator=generator)
    text_tokens, _ = model.text(masked, attention_mask)
    logits = model.mlm_logits(out.image_tokens, text_tokens, attention_mask)  # (B, T, V)
    return {"mlm": F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)}


def caption_loss(
    model: ImageTextModel, out: ModelOutput, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Next-token prediction of the caption given the image (teacher forcing)."""
    logits = model.caption_logits(out.image_tokens, input_ids, attention_mask)[:, :-1]
    targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    return {"caption": F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)}


def answer_targets(qa_ids: torch.Tensor, qa_mask: torch.Tensor) -> torch.Tensor:
    """``[CLS] question [SEP] answer [SEP]`` → the ids after the first [SEP] (the answer and
    its closing [SEP]), -100 elsewhere. A row without a question ("[CLS] [SEP]") has none."""
    sep = (qa_ids == tokenizer().sep_token_id).long()
    after = sep.cumsum(1) - sep  # [SEP]s before each position
    return qa_ids.masked_fill((after == 0) | (qa_mask == 0), -100)


class AnswerPrior:
    """How often each question was answered with each first answer token, over the batches
    this process has trained on: the question-only expert of a product of experts (Clark et
    al., 2019, "Don't Take the Easy Way Out"; ``loss.vqa_debias``). Training adds log(1 + count)
    to the decoder's logits at the answer's first token, so the decoder gains nothing by
    learning what the question alone predicts (in the sample crawl: the colours each shape came
    in, which are wrong for a held-out composition); evaluation and serving use the decoder
    alone. Counts are per process (each rank sees its share of the data) and start afresh on
    resume."""

    def __init__(self) -> None:
        self.counts: dict[tuple[int, ...], Counter[int]] = {}

    def bias(self, questions: list[tuple[int, ...]], vocab: int) -> torch.Tensor:
        """(len(questions), vocab) log(1 + count) of each token answering each question."""
        out = torch.zeros(len(questions), vocab)
        for row, question in enumerate(questions):
            for token, n in self.counts.get(question, {}).items():
                out[row, token] = math.log1p(n)
        return out

    def add(self, questions: list[tuple[int, ...]], answers: list[int]) -> None:
        for question, answer in zip(questions, answers, strict=True):
            self.counts.setdefault(question, Counter())[answer] += 1


def vqa_loss(
    model: ImageTextModel, out: ModelOutput, qa_ids: torch.Tensor, qa_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """BLIP-style generative VQA: the decoder, conditioned on the image and the question (its
    prefix: ``[CLS] question [SEP]``), predicts the answer; only the answer's tokens count, and
    only their positions go through the vocabulary projection. With ``model.answer_prior``
    (training with ``loss.vqa_debias``), the answer's first token is predicted by the decoder
    times the question's answer prior (``AnswerPrior``)."""
    states = model.decoder_states(out.image_tokens, qa_ids, qa_mask)[:, :-1]
    targets = answer_targets(qa_ids, qa_mask)[:, 1:]
    answered = targets != -100
    if not answered.any():  # no row has a question: zero, with gradients of zeros
        return {"vqa": model.lm_head(states).sum() * 0.0}
    rows, cols = answered.nonzero(as_tuple=True)
    logits, answers = model.lm_head(states[rows, cols]), targets[rows, cols]  # (N, V), (N,)
    prior: AnswerPrior | None = model.answer_prior
    if prior is not None:
        first = (cols == answered.int().argmax(1)[rows]).nonzero().flatten()  # each answer's first
        questions = [tuple(qa_ids[rows[i], : cols[i] + 1].tolist()) for i in first]
        bias = prior.bias(questions, logits.shape[-1]).to(logits)
        logits = logits.index_add(0, first, bias)
        prior.add(questions, answers[first].tolist())  # after: a question's own answer is no prior
    return {"vqa": F.cross_entropy(logits, answers)}


def compute_losses(
    model: ImageTextModel, batch: dict[str, torch.Tensor], weights: dict[str, float],
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """One forward pass, the requested terms, and their weighted sum: (total, terms)."""
    out = model(batch["pixels"], batch["input_ids"], batch["attention_mask"])
    terms: dict[str, torch.Tensor] = {}
    for name in weights:
        terms |= LOSSES[name](model, out, batch, generator)
    return combine(terms, weights), terms


class ClipLoss(nn.Module):
    def forward(self, model, out: ModelOutput, batch: dict, generator=None) -> dict:
        return clip_loss(out.image_embeds, out.text_embeds, out.logit_scale)


class SigLipLoss(nn.Module):
    def forward(self, model, out: ModelOutput, batch: dict, generator=None) -> dict:
        return siglip_loss(out.image_embeds, out.text_embeds, out.logit_scale, out.logit_bias)


class ItmLoss(nn.Module):
    def forward(self, model, out: ModelOutput, batch: dict, generator=None) -> dict:
        return itm_loss(model, out, batch["attention_mask"], generator)


class MlmLoss(nn.Module):
    def forward(self, model, out: ModelOutput, batch: dict, generator=None) -> dict:
        return mlm_loss(model, out, batch["input_ids"], batch["attention_mask"], generator)


class CaptionLoss(nn.Module):
    def forward(self, model, out: ModelOutput, batch: dict, generator=None) -> dict:
        return caption_loss(model, out, batch["input_ids"], batch["attention_mask"])


class VqaLoss(nn.Module):
    def forward(self, model, out: ModelOutput, batch: dict, generator=None) -> dict:
        return vqa_loss(model, out, batch["qa_ids"], batch["qa_mask"])


# One line per term.
LOSSES: dict[str, nn.Module] = {
    "clip": ClipLoss(),
    "siglip": SigLipLoss(),
    "itm": ItmLoss(),
    "mlm": MlmLoss(),
    "caption": CaptionLoss(),
    "vqa": VqaLoss(),
}
