"""Captioning metrics: corpus BLEU-4 and CIDEr of generated captions against the reference
captions, with the COCO caption evaluation's own scorers (``pycocoevalcap``). Its PTB
tokenizer needs Java; captions are tokenized here as it does for plain text: lowercase words,
punctuation dropped."""

from __future__ import annotations

import re
from collections.abc import Sequence


def words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def caption_metrics(references: Sequence[str], generated: Sequence[str]) -> dict[str, float]:
    """One generated caption per image and its reference caption → ``bleu4`` and ``cider``."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(references) != len(generated) or not references:
        raise ValueError("need one generated caption per reference, at least one")
    refs = {i: [words(r)] for i, r in enumerate(references)}
    hyps = {i: [words(g) or "<empty>"] for i, g in enumerate(generated)}  # BLEU needs a word
    bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    cider, _ = Cider().compute_score(refs, hyps)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}
