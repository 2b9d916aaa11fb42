"""What is asked of a model's decoder, without torch: the generation settings, VQA's default,
the prompt of a question, and whether a model can caption or answer at all. The server's
request checks and the command lines import these before (or without) loading a model;
``mmcore.generate`` does the generating.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from mmcore.data.inputs import token_ids


@dataclasses.dataclass(kw_only=True, frozen=True)  # hashable: Serve batches by settings
class GenerationConfig:
    max_new_tokens: int = 20  # tokens after [CLS], [SEP] included
    num_beams: int = 1  # 1: greedy (or sampling with top_p)
    top_p: float | None = None  # nucleus sampling: the smallest set of tokens with this mass
    temperature: float = 1.0  # sampling only
    seed: int | None = None  # sampling only: the same seed, the same text
    num_return_sequences: int = 1  # texts per image: the best beams, at most num_beams

    def validate(self, context_length: int = 32) -> None:
        if not 1 <= self.max_new_tokens < context_length:
            raise ValueError(f"max_new_tokens must be in [1, {context_length - 1}]")
        if self.num_beams < 1:
            raise ValueError("num_beams must be >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_p is not None and self.num_beams > 1:
            raise ValueError("give num_beams or top_p, not both")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        if not 1 <= self.num_return_sequences <= self.num_beams:
            raise ValueError("num_return_sequences must be in [1, num_beams]")


def cannot(model, objective: str) -> str | None:
    """Why ``model`` cannot generate what ``objective`` ("caption" or "vqa") trains, or None.
    A model whose objectives are unknown (an export that predates recording them) can."""
    if not model.generates:
        return (f"this model (fusion={model.cfg.fusion}) has no decoder: train early, "
                f"cross_attention or hybrid fusion with the {objective} objective")  # fmt: skip
    if model.objectives is not None and objective not in model.objectives:
        return (f"this model's decoder was not trained with the {objective} objective (it "
                f"was trained on {', '.join(sorted(model.objectives))})")  # fmt: skip
    return None


ANSWER = GenerationConfig(max_new_tokens=8)  # VQA's default: answers are a word or two


def question_prompts(questions: Sequence[str], context_length: int) -> list[list[int]]:
    """The prompt of each question: its ids ``[CLS] question [SEP]`` (truncated to the
    context, which then leaves no room to answer: ``generate`` refuses it)."""
    ids, mask = token_ids(list(questions), context_length)
    return [row[: int(m.sum())].tolist() for row, m in zip(ids, mask, strict=True)]
