"""Curation steps as pure functions on ``dict[str, np.ndarray]`` batches.

Every row keeps flowing through every step: a rejected row keeps its ``status`` and
``error_message`` and is skipped by later steps, so the output accounts for every input row.
The Ray job (``pipelines/curate.py``) maps these over a Ray Dataset; tests call them directly.

    batch = clean_captions(batch, CaptionConfig())      # + caption, status, error_message
    batch = fetch_images(batch, FetchConfig())          # + image (downloaded bytes)
    batch = process_images(batch, ImageConfig())        # image → resized, encoded; + hashes
"""

from __future__ import annotations

import logging

import numpy as np

from mmcore.data.captions import CaptionConfig, caption_status, clean_caption
from mmcore.data.fetch import FetchConfig, fetch_many
from mmcore.data.images import ImageConfig, Rejected, process_image, sha256
from mmcore.data.shards import SUCCESS

Batch = dict[str, np.ndarray]
log = logging.getLogger(__name__)


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _ok(batch: Batch) -> list[int]:
    """Rows still in ``success``; also makes the status columns writable object arrays
    (Ray may hand strings over as fixed-width arrays that would truncate a longer status)."""
    for col in ("status", "error_message"):
        batch[col] = _objects(list(batch[col]))
    return [i for i, s in enumerate(batch["status"]) if s == SUCCESS]


def clean_captions(batch: Batch, cfg: CaptionConfig) -> Batch:
    """Normalise captions and start the accounting: ``status`` is set for every row."""
    captions = [clean_caption(c) for c in batch["caption"]]
    checks = [caption_status(c, cfg) for c in captions]
    batch["caption"] = _objects(captions)
    batch["status"] = _objects([c[0] if c else SUCCESS for c in checks])
    batch["error_message"] = _objects([c[1] if c else "" for c in checks])
    return batch


def fetch_images(batch: Batch, cfg: FetchConfig) -> Batch:
    """Download the image of every row still in ``success``; failures get their reason."""
    rows = _ok(batch)
    images: list[bytes | None] = [None] * len(batch["status"])
    for i, result in zip(rows, fetch_many([str(batch["url"][i]) for i in rows], cfg), strict=True):
        if isinstance(result, Rejected):
            batch["status"][i], batch["error_message"][i] = result.status, result.message
        else:
            images[i] = result
    batch["image"] = _objects(images)
    return batch


def process_images(batch: Batch, cfg: ImageConfig) -> Batch:
    """Decode, check, hash, resize and encode; ``image`` becomes the output bytes."""
    n = len(batch["status"])
    sizes = ("width", "height", "original_width", "original_height")
    ints = {c: np.zeros(n, np.int32) for c in sizes}
    digests, hashes, thumbs = [""] * n, np.zeros(n, np.uint64), [b""] * n
    images = list(batch["image"])
    for i in _ok(batch):
        raw, images[i] = images[i], None
        digests[i] = sha256(raw)
        try:
            out = process_image(raw, cfg)
        except Rejected as e:
            batch["status"][i], batch["error_message"][i] = e.status, e.message
            continue
        except Exception as e:  # noqa: BLE001 - one odd image must not stop the job
            log.warning("unexpected error on %s", batch["key"][i], exc_info=True)
            batch["status"][i], batch["error_message"][i] = "failed_to_process", repr(e)
            continue
        images[i], hashes[i], thumbs[i] = out.data, out.phash, out.thumb
        for col in ints:
            ints[col][i] = getattr(out, col)
    batch.update(ints, image=_objects(images), sha256=_objects(digests), phash=hashes)
    batch["thumb"] = _objects(thumbs)
    return batch
