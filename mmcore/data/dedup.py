"""Exact and near-duplicate detection over a whole job, deterministic in the sample keys.

Samples are visited in key order and the smallest key of each group is kept, so the result
does not depend on the order in which workers finished (a resumed run equals a fresh one).

Near duplicates (re-encoded, rescaled copies) have 64-bit perceptual hashes within Hamming
distance ``t`` AND 4×4 RGB thumbnails within ``colour_tolerance``: phash sees only grey
levels, so without the colour check a red and a green circle in the same place would match.
Candidates come from t+1 bands of the hash: by the pigeonhole principle, hashes within
distance t agree exactly on at least one band, so banding finds every such pair without
comparing all pairs.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence

from mmcore.data.images import colour_distance, hamming


@dataclasses.dataclass(kw_only=True)
class DedupConfig:
    exact: bool = True  # same sha256 of the downloaded bytes: duplicate
    near: bool = True  # similar phash and colours: near_duplicate
    # Max Hamming distance of 64-bit phashes. Rescaled, re-encoded copies of the sample
    # crawl came within 4; distinct images within 8 all had other colours (colour guard).
    phash_threshold: int = 6
    colour_tolerance: int = 12  # max per-channel difference of 4×4 thumbnails (0-255)

    def validate(self) -> None:
        if not 0 <= self.phash_threshold <= 16:
            raise ValueError("phash_threshold must be in [0, 16]")
        if not 0 <= self.colour_tolerance <= 255:
            raise ValueError("colour_tolerance must be in [0, 255]")


@dataclasses.dataclass
class _Kept:
    key: str
    phash: int
    thumb: bytes


def find_duplicates(
    keys: Sequence[str],
    sha256: Sequence[str],
    phash: Sequence[int],
    thumb: Sequence[bytes],
    cfg: DedupConfig,
) -> dict[str, tuple[str, str]]:
    """Map each dropped key to ``(status, kept_key)``; kept samples are absent."""
    dropped: dict[str, tuple[str, str]] = {}
    first_by_sha: dict[str, str] = {}
    bands = _band_masks(cfg.phash_threshold)
    buckets: list[dict[int, list[int]]] = [defaultdict(list) for _ in bands]
    kept: list[_Kept] = []
    for i in sorted(range(len(keys)), key=keys.__getitem__):
        sample = _Kept(keys[i], int(phash[i]), thumb[i])
        if cfg.exact:
            if sha256[i] in first_by_sha:
                dropped[sample.key] = ("duplicate", first_by_sha[sha256[i]])
                continue
            first_by_sha[sha256[i]] = sample.key
        if cfg.near:
            candidates: set[int] = set()
            for (shift, mask), bucket in zip(bands, buckets, strict=True):
                candidates.update(bucket.get((sample.phash >> shift) & mask, ()))
            match = next(
                (kept[j].key for j in sorted(candidates) if _near(sample, kept[j], cfg)), None
            )
            if match is not None:  # candidates are in key order: the smallest key wins
                dropped[sample.key] = ("near_duplicate", match)
                continue
            for (shift, mask), bucket in zip(bands, buckets, strict=True):
                bucket[(sample.phash >> shift) & mask].append(len(kept))
        kept.append(sample)
    return dropped


def _near(a: _Kept, b: _Kept, cfg: DedupConfig) -> bool:
    return (
        hamming(a.phash, b.phash) <= cfg.phash_threshold
        and colour_distance(a.thumb, b.thumb) <= cfg.colour_tolerance
    )


def _band_masks(threshold: int) -> list[tuple[int, int]]:
    """Split 64 bits into threshold+1 contiguous bands: (shift, mask) each."""
    n = threshold + 1
    edges = [round(64 * i / n) for i in range(n + 1)]
    return [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:], strict=False)]
