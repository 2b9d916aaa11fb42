"""VQA scoring: exact match of normalised answers (VQAv2's processing, short of its
number-word and article rules, which single-word answers here do not need), overall and
by question type, beside the majority-answer baseline: always giving the most common
answer of the question's type in the same set. That baseline is computed on the references
themselves, so no prior-only answerer can beat it."""

from __future__ import annotations

import collections
from collections.abc import Sequence

from mmcore.eval.caption import words


def normalise(answer: str) -> str:
    """Lowercase words, punctuation dropped: "Red." → "red"."""
    return words(answer)


def vqa_metrics(
    references: Sequence[str], predictions: Sequence[str], types: Sequence[str] | None = None
) -> dict:
    """``accuracy``, ``majority_baseline`` and ``n_questions``, and ``by_type`` with the same
    per question type when ``types`` are given."""
    if len(references) != len(predictions) or not references:
        raise ValueError("need one predicted answer per reference answer, at least one")
    types = list(types) if types is not None else [""] * len(references)
    refs = [normalise(r) for r in references]
    hits = [normalise(p) == r for p, r in zip(predictions, refs, strict=True)]

    def summary(rows: list[int]) -> dict[str, float]:
        majority: dict[str, int] = collections.Counter()  # per type: its top answer's count
        for (t, _), n in collections.Counter((types[i], refs[i]) for i in rows).items():
            majority[t] = max(majority[t], n)
        return {"accuracy": sum(hits[i] for i in rows) / len(rows),
                "majority_baseline": sum(majority.values()) / len(rows),
                "n_questions": len(rows)}  # fmt: skip

    metrics = summary(list(range(len(refs))))
    if any(types):
        metrics["by_type"] = {
            t: summary([i for i in range(len(refs)) if types[i] == t]) for t in sorted(set(types))
        }
    return metrics
