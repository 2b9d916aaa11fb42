"""Curation by a model: image-caption alignment filtering and semantic deduplication.

DataComp's CLIP-score filter keeps the pairs whose image and caption a trained model finds
aligned; semantic dedup (NeMo Curator's) drops images whose embeddings nearly coincide with
a kept one's. Both take one model pass over every decoded row (``score``: alignment, and
the image embedding), then decisions over the whole job (``decide``):

  1. rows the hash dedup kept are the pool; ``min_score`` keeps those scoring at least it,
     ``keep_fraction`` the best scoring fraction of the pool (ties: smaller key first);
     the others become ``low_alignment``, the score and the cut-off in ``error_message``;
  2. among the rows still kept, with ``dedup.semantic``, a row whose image embedding has
     cosine ``>= dedup.semantic_threshold`` with an earlier kept row becomes
     ``semantic_duplicate`` of the smallest such key (the key-order rule of the hash dedup,
     over ANN pairs).

The alignment is the embeddings' cosine for late fusion, the ITM match probability for
variants that score pairs (``Engine.embed_pairs``). Rows are scored in fixed batches in key
order, so a resumed job computes the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from mmcore.data.dedup import resolve_near
from mmcore.data.inputs import preprocess

LOW_ALIGNMENT, SEMANTIC_DUPLICATE = "low_alignment", "semantic_duplicate"


@dataclasses.dataclass(kw_only=True)
class AlignmentConfig:
    # The model that scores pairs: a folder, runs:/ID/model or models:/NAME@ALIAS with
    # image and text embeddings (late or hybrid fusion). Empty: no model stage.
    model: str = ""
    min_score: float | None = None  # keep rows scoring at least this
    keep_fraction: float | None = None  # or keep this best-scoring fraction (DataComp: 0.3)
    batch_size: int = 64  # rows per model call (fixed: the numbers depend on it, slightly)

    def validate(self) -> None:
        if self.min_score is not None and self.keep_fraction is not None:
            raise ValueError("alignment: give min_score or keep_fraction, not both")
        if self.min_score is not None and not -1 <= self.min_score <= 1:
            raise ValueError(f"alignment.min_score={self.min_score} must be in [-1, 1]")
        if self.keep_fraction is not None and not 0 < self.keep_fraction <= 1:
            raise ValueError(f"alignment.keep_fraction={self.keep_fraction} must be in (0, 1]")
        if self.batch_size < 1:
            raise ValueError("alignment.batch_size must be >= 1")
        if (self.min_score is not None or self.keep_fraction is not None) and not self.model:
            raise ValueError("alignment.min_score and keep_fraction need alignment.model")


def score(
    engine, keys: Sequence[str], images: Sequence[bytes], captions: Sequence[str], batch_size: int
) -> pa.Table:
    """Decoded rows (encoded resized images, clean captions) → ``key``, ``alignment`` and the
    unit ``image_embedding``, in key order, ``batch_size`` rows per model call."""
    import torch

    order = sorted(range(len(keys)), key=keys.__getitem__)
    cfg, out = engine.cfg, {"alignment": [], "image_embedding": []}
    for lo in range(0, len(order), batch_size):
        rows = order[lo : lo + batch_size]
        batch = {"jpg": [images[i] for i in rows], "txt": [captions[i] for i in rows],
                 "__key__": [keys[i] for i in rows]}  # fmt: skip
        inputs = preprocess(batch, cfg.vision.image_size, cfg.text.context_length)
        tensors = (torch.from_numpy(inputs[k]) for k in ("pixels", "input_ids", "attention_mask"))
        result = engine.embed_pairs(*tensors)
        for name in out:
            out[name].append(result[name])
    dim = cfg.embed_dim
    embeddings = np.concatenate(out["image_embedding"]) if order else np.zeros((0, dim), "f4")
    alignment = np.concatenate(out["alignment"]) if order else np.zeros(0, "f4")
    return pa.table({
        "key": pa.array([keys[i] for i in order], pa.string()),
        "alignment": pa.array(alignment.astype(np.float32)),
        "image_embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(embeddings.astype(np.float32).ravel()), dim),
    })  # fmt: skip


def keep_mask(scores: np.ndarray, cfg: AlignmentConfig) -> tuple[np.ndarray, float | None]:
    """Which of the pool's rows (in key order) the alignment filter keeps, and the cut-off
    score (None: no filter)."""
    if cfg.min_score is not None:
        return scores >= cfg.min_score, cfg.min_score
    if cfg.keep_fraction is None or not len(scores):
        return np.ones(len(scores), bool), None
    k = math.ceil(cfg.keep_fraction * len(scores))
    best = np.lexsort((np.arange(len(scores)), -scores))[:k]  # by score, then key order
    keep = np.zeros(len(scores), bool)
    keep[best] = True
    return keep, float(scores[best[-1]])


def semantic_duplicates(embeddings: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows (in key order) whose embedding is within ``threshold`` cosine of an earlier kept
    row: (dropped rows, the row each duplicates), by the key-order rule."""
    from mmcore.vectors import close_pairs

    later, earlier = close_pairs(embeddings, threshold)
    return resolve_near(later, earlier)
