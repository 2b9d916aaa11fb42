"""The fusion variants and what each can do, without torch: drivers that only check a
config (``mmray embed``, ``mmray index``) read these without loading the model code."""

from __future__ import annotations

import dataclasses
from typing import Literal

Fusion = Literal["late", "early", "cross_attention", "gated", "film", "hybrid"]
ITC = frozenset({"clip", "siglip"})  # contrastive terms, on the tower embeddings
PAIR = frozenset({"itm", "mlm", "caption", "vqa"})  # terms on the fusion module
DECODER = frozenset({"caption", "vqa"})  # terms that train the causal decoder


@dataclasses.dataclass(frozen=True)
class Variant:
    """What a fusion variant can do, decided here once; code asks the model
    (``model.has_itc``), never the variant's name."""

    objectives: frozenset[str]  # the loss terms it trains
    # Trained contrastive embeddings: ranking is one matrix product (and hybrid shortlists).
    has_itc: bool
    scores_pairs: bool  # a fusion module whose ITM head scores each (image, text) pair
    generates: bool  # the fusion module keeps text tokens: an LM head (MLM, captions, VQA)


# The pure fusion variants learn to match pairs inside the fusion module only; hybrid (ALBEF)
# contrasts first, then matches, so it needs an ITC term, mines ITM hard negatives from it,
# and ranks by an ITC shortlist at inference.
VARIANTS: dict[str, Variant] = {
    "late": Variant(ITC, has_itc=True, scores_pairs=False, generates=False),
    "early": Variant(PAIR, has_itc=False, scores_pairs=True, generates=True),
    "cross_attention": Variant(PAIR, has_itc=False, scores_pairs=True, generates=True),
    "gated": Variant(frozenset({"itm"}), has_itc=False, scores_pairs=True, generates=False),
    "film": Variant(frozenset({"itm"}), has_itc=False, scores_pairs=True, generates=False),
    "hybrid": Variant(ITC | PAIR, has_itc=True, scores_pairs=True, generates=True),
}
OBJECTIVES = {name: v.objectives for name, v in VARIANTS.items()}


def trains_decoder(fusion: str, terms: dict[str, float]) -> bool:
    """Whether training ``fusion`` on ``terms`` trains the causal decoder (captions, VQA)."""
    return VARIANTS[fusion].generates and bool(DECODER & set(terms))
