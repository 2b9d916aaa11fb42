"""Text from an image: the image-grounded causal decoder that the ``caption`` and ``vqa``
objectives train (the variants that keep text tokens: ``early``, ``cross_attention``,
``hybrid``). A caption continues ``[CLS]``; an answer continues ``[CLS] question [SEP]``.

Greedy search, beam search (``num_beams``; the best ``num_return_sequences`` beams of each
image, as in transformers) and nucleus sampling (``top_p``, ``temperature``, seeded), batched
over images. Each sequence continues its prompt and ends at ``[SEP]`` or after
``max_new_tokens``; its score is the mean log-probability of its tokens (``[SEP]``
included), by which beams are ranked, so greedy search equals beam search with one beam.

No key/value cache: every step runs the decoder over the whole prefix again. The image tower
runs once per image; the decoder is 2 layers of width 128 over at most ``context_length``
(32) tokens, so re-running it costs little at this size (a greedy caption through Serve takes
~150 ms per image on 2 cores, docs/BENCHMARKS.md), and the code stays one call of
``decoder_states``, whose last position alone goes through the vocabulary projection (the
larger cost). That call is causal (a position never sees a later one, tested), so the
logits of the last position are those a cached decoder would give. A larger decoder would
want the cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch

from mmcore.models.towers import tokenizer
from mmcore.tasks import GenerationConfig


@torch.no_grad()
def generate(
    model, pixels: torch.Tensor, cfg: GenerationConfig, prompts: list[list[int]] | None = None
) -> list[tuple[str, float]]:
    """Preprocessed images (B, 3, S, S) → (text, score) for each, or its best
    ``num_return_sequences`` one after another (B·R, best first); ``model.generates``.
    ``prompts``: the token ids each sequence starts from, one list per image (default
    ``[CLS]``: a caption; VQA gives ``[CLS] question [SEP]``); the text is what follows.
    Images with prompts of one length decode together; the new tokens are at most the room
    the context leaves after the prompt."""
    if not model.generates:
        raise ValueError(f"fusion={model.cfg.fusion!r} has no decoder: it cannot generate text")
    context = model.cfg.text.context_length
    cfg.validate(context)
    tok = tokenizer()
    prompts = prompts or [[tok.cls_token_id]] * len(pixels)
    image_tokens = model.vision(pixels)[0]
    search = _beam if cfg.num_beams > 1 else _sample if cfg.top_p is not None else _greedy
    r = cfg.num_return_sequences
    out: list[tuple[str, float]] = [("", 0.0)] * (len(prompts) * r)
    for length in sorted({len(p) for p in prompts}):
        if length >= context:
            raise ValueError(f"a prompt of {length} tokens leaves no room in the context "
                             f"of {context} tokens")  # fmt: skip
        rows = [i for i, p in enumerate(prompts) if len(p) == length]
        start = torch.tensor([prompts[i] for i in rows], dtype=torch.long)
        room = dataclasses.replace(cfg, max_new_tokens=min(cfg.max_new_tokens, context - length))
        ids, scores = search(model, image_tokens[rows], start, room)  # (len(rows)·r, …)
        places = [i * r + j for i in rows for j in range(r)]
        for i, row, score in zip(places, ids[:, length:].tolist(), scores, strict=True):
            out[i] = (_text(tok, row), float(score))
    return out


def generate_chunks(
    model, chunks: Iterable[torch.Tensor], cfg: GenerationConfig,
    prompts: list[list[int]] | None = None,
) -> list[tuple[str, float]]:  # fmt: skip
    """``generate`` over successive chunks of preprocessed images, each with its slice of
    ``prompts``: a bounded batch per forward pass, whatever the number of images."""
    out: list[tuple[str, float]] = []
    start = 0
    for pixels in chunks:
        part = None if prompts is None else prompts[start : start + len(pixels)]
        out += generate(model, pixels, cfg, part)
        start += len(pixels)
    return out


def _text(tok, ids: list[int]) -> str:
    if tok.sep_token_id in ids:
        ids = ids[: ids.index(tok.sep_token_id)]
    return tok.decode(ids, skip_special_tokens=True)


def _step(model, image_tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the next token after each prefix: (B, T) → (B, V)."""
    logits = model.lm_head(model.decoder_states(image_tokens, ids, torch.ones_like(ids))[:, -1])
    return logits.float().log_softmax(-1)


def _greedy(model, image_tokens, ids, cfg: GenerationConfig) -> tuple[torch.Tensor, ...]:
    return _decode(model, image_tokens, ids, cfg, lambda logp: logp.argmax(-1))


def _sample(model, image_tokens, ids, cfg: GenerationConfig) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None

    def pick(logp: torch.Tensor) -> torch.Tensor:
        probs = (logp / cfg.temperature).softmax(-1)
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= cfg.top_p  # mass before it ≥ p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return order.gather(-1, choice)[:, 0]

    return _decode(model, image_tokens, ids, cfg, pick)


def _decode(model, image_tokens, ids, cfg: GenerationConfig, pick) -> tuple[torch.Tensor, ...]:
    """One sequence per image, a token at a time after the prompt ``ids``; finished ones
    repeat [SEP] at no cost."""
    sep = tokenizer().sep_token_id
    total = torch.zeros(len(ids))
    length = torch.zeros(len(ids))
    done = torch.zeros(len(ids), dtype=torch.bool)
    for _ in range(cfg.max_new_tokens):
        logp = _step(model, image_tokens, ids)
        token = torch.where(done, sep, pick(logp))
        total += torch.where(done, 0.0, logp.gather(-1, token[:, None])[:, 0])
        length += (~done).float()
        ids = torch.cat([ids, token[:, None]], 1)
        done |= token == sep
        if done.all():
            break
    return ids, total / length


def _beam(model, image_tokens, ids, cfg: GenerationConfig) -> tuple[torch.Tensor, ...]:
    """Beam search, ``num_beams`` per image, batched as (B·K) rows; each image's best
    ``num_return_sequences`` sequences by mean log-probability, best first."""
    k, sep, n = cfg.num_beams, tokenizer().sep_token_id, len(image_tokens)
    images = image_tokens.repeat_interleave(k, 0)
    ids = ids.repeat_interleave(k, 0)
    total = torch.full((n, k), float("-inf"))
    total[:, 0] = 0.0  # one live beam to start: the others would repeat it
    length = torch.zeros(n, k)
    done = torch.zeros(n, k, dtype=torch.bool)
    for _ in range(cfg.max_new_tokens):
        logp = _step(model, images, ids).view(n, k, -1)
        finished = torch.full_like(logp[0, 0], float("-inf"))
        finished[sep] = 0.0  # a finished beam continues with [SEP], unchanged
        logp = torch.where(done[..., None], finished, logp)
        best, flat = (total[..., None] + logp).view(n, -1).topk(k, dim=-1)
        beam, token = flat // logp.shape[-1], flat % logp.shape[-1]
        rows = (torch.arange(n)[:, None] * k + beam).view(-1)
        length = length.gather(1, beam) + (~done.gather(1, beam)).float()
        done = done.gather(1, beam) | (token == sep)
        ids = torch.cat([ids[rows], token.view(-1, 1)], 1)
        total = best
        if done.all():
            break
    mean = total / length.clamp(min=1)
    best, pick = mean.topk(cfg.num_return_sequences, dim=-1)  # (n, r), best first
    rows = (torch.arange(n)[:, None] * k + pick).view(-1)
    return ids[rows], best.view(-1)
