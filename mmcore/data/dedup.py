"""Exact and near-duplicate detection over a whole job, deterministic in the sample keys.

Samples are visited in key order and the smallest key of each group is kept, so the result
does not depend on the order in which workers finished (a resumed run equals a fresh one).

Near duplicates (re-encoded, rescaled copies) have 64-bit perceptual hashes within Hamming
distance ``t`` AND 4×4 RGB thumbnails within ``colour_tolerance``: phash sees only grey
levels, so without the colour check a red and a green circle in the same place would match.
Candidates come from t+1 bands of the hash: by the pigeonhole principle, hashes within
distance t agree exactly on at least one band, so banding finds every such pair without
comparing all pairs.

``find_duplicates`` does it in one process. The curation job does the same across a cluster
with the batch functions below (``pipelines/dedup.py`` maps them over Ray Data groups): rows
carry an integer ``order`` (source, then key: earlier outputs given in ``dedup.against``
come first and are always kept), exact groups by sha256 keep their smallest order, band
buckets yield the near pairs, and ``resolve_near`` replays the key-order rule over the pairs
alone, so its memory grows with the near pairs, not with the rows.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from mmcore.data.images import colour_distance, hamming

ORDER_BASE = 10**12  # order = source * ORDER_BASE + int(key): keys have at most 12 digits


@dataclasses.dataclass(kw_only=True)
class DedupConfig:
    exact: bool = True  # same sha256 of the downloaded bytes: duplicate
    near: bool = True  # similar phash and colours: near_duplicate
    # Max Hamming distance of 64-bit phashes. Rescaled, re-encoded copies of the sample
    # crawl came within 4; distinct images within 8 all had other colours (colour guard).
    phash_threshold: int = 6
    colour_tolerance: int = 12  # max per-channel difference of 4×4 thumbnails (0-255)
    # Earlier curated outputs (folders or URIs, comma-separated) whose kept images are not
    # kept again: a match is a duplicate / near_duplicate of "URI#KEY" (incremental crawls).
    against: str = ""
    # Semantic dedup: a row whose image embedding (by alignment.model, which it needs) has
    # cosine >= semantic_threshold with a kept row's is a semantic_duplicate of it
    semantic: bool = False
    semantic_threshold: float = 0.99

    @property
    def against_uris(self) -> list[str]:
        return [u.strip() for u in self.against.split(",") if u.strip()]

    def validate(self) -> None:
        if not 0 <= self.phash_threshold <= 16:
            raise ValueError("phash_threshold must be in [0, 16]")
        if not 0 <= self.colour_tolerance <= 255:
            raise ValueError("colour_tolerance must be in [0, 255]")
        if not 0 < self.semantic_threshold <= 1:
            raise ValueError(f"semantic_threshold={self.semantic_threshold} must be in (0, 1]")


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


# --- the same, as batch functions over a cluster's groups ------------------------------------

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Sources:
    """The datasets one dedup sees: earlier outputs (``dedup.against``), then this job's rows,
    each with the width of its zero-padded keys."""

    priors: tuple[str, ...] = ()
    widths: tuple[int, ...] = ()  # key width per prior, then this job's

    @property
    def current(self) -> int:
        return len(self.priors)

    def order(self, source: int, keys: Sequence[str]) -> np.ndarray:
        return source * ORDER_BASE + np.asarray([int(k) for k in keys], np.int64)

    def ref(self, order: int) -> str:
        """``KEY`` for this job's rows, ``URI#KEY`` for an earlier output's."""
        source, key = divmod(int(order), ORDER_BASE)
        key_text = f"{key:0{self.widths[source]}d}"
        return key_text if source == self.current else f"{self.priors[source]}#{key_text}"


def exact_group(group: Batch) -> Batch:
    """Rows of any number of sha256s (all rows of each) → each with ``dup_of``: -1 for the
    smallest order of its sha256 (kept), else that order."""
    sha = np.asarray(group["sha256"], dtype="S64")
    idx = np.lexsort((group["order"], sha))
    out = {k: v[idx] for k, v in group.items()}
    sha = sha[idx]
    first = np.ones(len(sha), bool)
    first[1:] = sha[1:] != sha[:-1]
    run_start = np.maximum.accumulate(np.where(first, np.arange(len(sha)), 0))
    return out | {"dup_of": np.where(first, -1, out["order"][run_start]).astype(np.int64)}


def band_rows(batch: Batch, threshold: int) -> Batch:
    """Each row once per band of its phash: ``band``, ``value`` (the band's bits)."""
    phash = batch["phash"].astype(np.uint64)
    parts = []
    for band, (shift, mask) in enumerate(_band_masks(threshold)):
        value = (phash >> np.uint64(shift)) & np.uint64(mask)
        parts.append(batch | {"band": np.full(len(phash), band, np.int8), "value": value})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def near_pairs(group: Batch, cfg: DedupConfig, first_current: int) -> Batch:
    """One band bucket's near pairs (``later``, ``earlier`` orders) where ``later`` is this
    job's row (orders from ``first_current`` on): within the Hamming threshold and the
    colour tolerance."""
    idx = np.argsort(group["order"], kind="stable")
    order = group["order"][idx]
    rows, cols = close_pairs(group["phash"][idx].astype(np.uint64), cfg.phash_threshold)
    mine = order[rows] >= first_current
    rows, cols = rows[mine], cols[mine]
    if len(rows):
        thumbs = group["thumb"][idx]
        a = np.stack([np.frombuffer(thumbs[r], np.uint8) for r in rows]).astype(np.int16)
        b = np.stack([np.frombuffer(thumbs[c], np.uint8) for c in cols]).astype(np.int16)
        close = np.abs(a - b).max(axis=1) <= cfg.colour_tolerance
        rows, cols = rows[close], cols[close]
    return {"later": order[rows], "earlier": order[cols]}


def close_pairs(phash: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of positions (i, j), i > j, whose hashes are within ``threshold`` bits.

    A band bucket holds rows / 2^(band bits) rows, so comparing all its pairs would grow with
    the square of the rows. The pigeonhole split applies again to the bits its rows do not all
    share: a close pair agrees on one of threshold+1 chunks of them. Per chunk, the rows sorted
    by its value put the candidates side by side, and each row is compared with the next ones
    of the same value only: the work follows the candidates, not the square of the bucket."""
    n = len(phash)
    differ = int(np.bitwise_or.reduce(phash ^ phash[0])) if n else 0
    free = [bit for bit in range(64) if differ >> bit & 1]
    found_i, found_j = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for chunk in np.array_split(np.array(free, np.uint64), threshold + 1):
        value = np.zeros(n, np.uint64)
        for k, bit in enumerate(chunk):
            value |= ((phash >> bit) & np.uint64(1)) << np.uint64(k)
        pos = np.argsort(value, kind="stable")  # equal values together, each run in order
        value = value[pos]
        start, step = np.arange(n - 1), 1  # rows compared with the row `step` further on
        while len(start):
            start = start[start + step < n]
            start = start[value[start + step] == value[start]]  # still within a run
            i, j = pos[start + step], pos[start]
            close = np.bitwise_count(phash[i] ^ phash[j]) <= threshold
            found_i.append(i[close])
            found_j.append(j[close])
            step += 1
    pairs = np.unique(np.stack([np.concatenate(found_i), np.concatenate(found_j)], 1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def resolve_near(later: np.ndarray, earlier: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The key-order rule of ``find_duplicates`` over near pairs alone: in order, a row is a
    near duplicate of the smallest earlier row near it that is still kept (a row with no
    earlier neighbour, an earlier output's row among them, is kept). Returns (dropped orders,
    the order each duplicates), both sorted by the dropped order."""
    if not len(later):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pairs = np.unique(np.stack([later, earlier], axis=1), axis=0)  # by later, then earlier
    nodes, starts = np.unique(pairs[:, 0], return_index=True)
    dropped = np.zeros(len(nodes), bool)
    match = np.full(len(nodes), -1, np.int64)
    ends = np.append(starts[1:], len(pairs))
    for i, (lo, hi) in enumerate(zip(starts, ends, strict=True)):
        for e in pairs[lo:hi, 1]:
            pos = np.searchsorted(nodes, e)
            if pos < len(nodes) and nodes[pos] == e and dropped[pos]:
                continue  # that neighbour is a duplicate itself: not kept
            dropped[i], match[i] = True, e
            break
    return nodes[dropped], match[dropped]
