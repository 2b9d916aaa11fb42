"""Curation steps as pure functions on ``dict[str, np.ndarray]`` batches.

Every row keeps flowing through every step: a rejected row keeps its ``status`` and
``error_message`` and is skipped by later steps, so the output accounts for every input row.
The Ray job (``pipelines/curate.py``) maps these over a Ray Dataset; tests call them directly.

    batch = clean_captions(batch, CaptionConfig())       # + caption, status, error_message
    batch = fetch_and_process(batch, FetchConfig(), ImageConfig())
    # + image (resized, encoded), sha256, phash, thumb, width, height, original_*
"""

from __future__ import annotations

import logging

import numpy as np

from mmcore.data.captions import CaptionConfig, caption_status, clean_caption
from mmcore.data.fetch import FetchConfig, fetch_many
from mmcore.data.images import ImageConfig, ProcessedImage, Rejected, process_image, sha256
from mmcore.data.shards import SUCCESS

Batch = dict[str, np.ndarray]
SIZES = ("width", "height", "original_width", "original_height")
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


def fetch_and_process(
    batch: Batch, fetch_cfg: FetchConfig, image_cfg: ImageConfig, process_threads: int = 1
) -> Batch:
    """Download, then decode, check, hash, resize and encode every row still in ``success``.

    Images are processed on ``process_threads`` threads as soon as they arrive, so CPU work
    overlaps the downloads; 1 thread uses about one core.
    """
    rows = _ok(batch)
    n = len(batch["status"])
    ints = {c: np.zeros(n, np.int32) for c in SIZES}
    images: list[bytes | None] = [None] * n
    digests, hashes, thumbs = [""] * n, np.zeros(n, np.uint64), [b""] * n
    urls = [str(batch["url"][i]) for i in rows]
    results = fetch_many(urls, fetch_cfg, lambda data: _process(data, image_cfg), process_threads)
    for i, result in zip(rows, results, strict=True):
        if isinstance(result, Rejected):
            batch["status"][i], batch["error_message"][i] = result.status, result.message
            continue
        digests[i], out = result
        images[i], hashes[i], thumbs[i] = out.data, out.phash, out.thumb
        for col in SIZES:
            ints[col][i] = getattr(out, col)
    batch.update(ints, phash=hashes)
    batch.update(image=_objects(images), sha256=_objects(digests), thumb=_objects(thumbs))
    return batch


def _process(data: bytes, cfg: ImageConfig) -> tuple[str, ProcessedImage]:
    try:
        return sha256(data), process_image(data, cfg)
    except Rejected:
        raise
    except Exception as e:  # noqa: BLE001 - one odd image must not stop the job
        log.warning("unexpected error processing an image", exc_info=True)
        raise Rejected("failed_to_process", repr(e)) from e
