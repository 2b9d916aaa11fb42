from __future__ import annotations

import collections
import random

import numpy as np
import pytest

from mmcore.data.dedup import (
    ORDER_BASE,
    DedupConfig,
    Sources,
    band_rows,
    close_pairs,
    exact_group,
    find_duplicates,
    near_pairs,
    resolve_near,
)
from mmcore.data.images import hamming

GREY = bytes([128] * 48)


def test_exact_duplicates_keep_the_smallest_key_in_any_order() -> None:
    keys, shas = ["003", "001", "002", "004"], ["a", "a", "b", "a"]
    cfg = DedupConfig(near=False)
    for _ in range(5):
        order = random.sample(range(4), 4)
        dropped = find_duplicates(
            [keys[i] for i in order], [shas[i] for i in order], [0] * 4, [GREY] * 4, cfg
        )
        assert dropped == {"003": ("duplicate", "001"), "004": ("duplicate", "001")}


def test_near_duplicates_need_close_phash_and_close_colours() -> None:
    base = 0x0123_4567_89AB_CDEF
    other_colours = bytes([128] * 40 + [10] * 8)  # same layout, some cells another colour
    dropped = find_duplicates(
        ["1", "2", "3", "4"],
        ["a", "b", "c", "d"],
        [base, base ^ 0b1011, base ^ 0b1, base ^ (0xFFFF << 20)],  # d: 16 bits away
        [GREY, bytes([130] * 48), other_colours, GREY],
        DedupConfig(phash_threshold=4, colour_tolerance=12),
    )
    assert dropped == {"2": ("near_duplicate", "1")}


def test_banding_finds_exactly_the_pairs_brute_force_finds() -> None:
    rng = random.Random(0)
    hashes = [rng.getrandbits(64) for _ in range(300)]
    for i in range(0, 300, 10):  # plant near copies at distances 0..6
        flips = rng.sample(range(64), rng.randint(0, 6))
        hashes[i + 1] = hashes[i] ^ sum(1 << b for b in flips)
    keys = [f"{i:04d}" for i in range(300)]
    cfg = DedupConfig(phash_threshold=4, colour_tolerance=255)
    dropped = find_duplicates(keys, keys, hashes, [GREY] * 300, cfg)
    expected: dict[str, tuple[str, str]] = {}
    kept: list[int] = []
    for i, h in enumerate(hashes):  # brute force, in key order
        match = next((j for j in kept if hamming(h, hashes[j]) <= 4), None)
        if match is None:
            kept.append(i)
        else:
            expected[keys[i]] = ("near_duplicate", keys[match])
    assert dropped == expected
    assert len(expected) >= 10  # the planted copies within distance 4 were found


def test_switches() -> None:
    args = (["1", "2"], ["a", "a"], [7, 7], [GREY, GREY])
    assert find_duplicates(*args, DedupConfig(exact=False, near=False)) == {}
    assert find_duplicates(*args, DedupConfig(exact=False))["2"][0] == "near_duplicate"


def _grouped(rows: dict[str, np.ndarray], columns: list[str]) -> list[dict[str, np.ndarray]]:
    """What a Ray Data groupby hands to map_groups: the rows of each key, as a batch."""
    groups: dict[tuple, list[int]] = collections.defaultdict(list)
    for i, key in enumerate(zip(*(rows[c] for c in columns), strict=True)):
        groups[key].append(i)
    return [{k: v[idx] for k, v in rows.items()} for idx in groups.values()]


def _cluster_dedup(keys, shas, hashes, thumbs, cfg, prior=None) -> dict[str, tuple[str, str]]:
    """The batch functions the curation job runs on Ray Data, applied group by group here."""
    priors = () if prior is None else ("s3://old/shards",)
    sources = Sources(priors, (len(keys[0]),) * (len(priors) + 1))
    parts = [(sources.current, keys, shas, hashes, thumbs)] + ([(0, *prior)] if prior else [])
    rows = {
        "order": np.concatenate([sources.order(s, k) for s, k, *_ in parts]),
        "sha256": np.array([x for p in parts for x in p[2]], object),
        "phash": np.array([x for p in parts for x in p[3]], np.uint64),
        "thumb": np.array([x for p in parts for x in p[4]], object),
    }
    rows["bucket"] = np.asarray([hash(s) % 3 for s in rows["sha256"]])  # many sha256s a group
    exact = [exact_group(g) for g in _grouped(rows, ["bucket"])]
    exact = {k: np.concatenate([g[k] for g in exact]) for k in exact[0]}
    first = sources.current * ORDER_BASE
    dropped = {sources.ref(o): ("duplicate", sources.ref(d))
               for o, d in zip(exact["order"], exact["dup_of"], strict=True)
               if d >= 0 and o >= first}  # fmt: skip
    keep = exact["dup_of"] < 0
    bands = band_rows({k: v[keep] for k, v in exact.items()}, cfg.phash_threshold)
    pairs = [near_pairs(g, cfg, first) for g in _grouped(bands, ["band", "value"])]
    later, match = resolve_near(*(np.concatenate([p[k] for p in pairs]) for k in pairs[0]))
    return dropped | {sources.ref(o): ("near_duplicate", sources.ref(m))
                      for o, m in zip(later, match, strict=True)}  # fmt: skip


def test_the_cluster_batch_functions_equal_the_one_process_dedup() -> None:
    """Random crawls full of exact copies and chains of near copies (a near b near c, a not
    near c), shuffled keys: the group-by-group result equals find_duplicates exactly."""
    rng = np.random.default_rng(0)
    near = 0
    for trial in range(20):
        n = 300
        keys = [f"{i:08d}" for i in rng.permutation(n)]
        bases = rng.integers(0, 2**63, 30, dtype=np.int64)
        flips = [int(sum(1 << int(b) for b in rng.choice(64, rng.integers(0, 9), replace=False)))
                 for _ in range(n)]  # fmt: skip
        hashes = [int(bases[rng.integers(30)]) ^ f for f in flips]
        thumbs = [bytes(rng.integers(100, 100 + rng.integers(1, 30), 48, dtype=np.uint8))
                  for _ in range(n)]  # fmt: skip
        shas = [f"s{rng.integers(0, 300 if trial % 2 else 3000)}" for _ in range(n)]
        cfg = DedupConfig(phash_threshold=int(rng.integers(2, 8)))
        expected = find_duplicates(keys, shas, hashes, thumbs, cfg)
        assert _cluster_dedup(keys, shas, hashes, thumbs, cfg) == expected
        near += sum(s == "near_duplicate" for s, _ in expected.values())
    assert near > 200


def test_rows_matching_an_earlier_output_name_it() -> None:
    cfg = DedupConfig(phash_threshold=4)
    prior = (["00000000", "00000001"], ["x", "y"], [0xF0F0, 0xFF00FF], [GREY, GREY])
    keys, shas = ["00000000", "00000001", "00000002"], ["x", "z", "w"]
    got = _cluster_dedup(keys, shas, [1, 0xFF00FF ^ 0b11, 1 << 40], [GREY] * 3, cfg, prior)
    assert got == {
        "00000000": ("duplicate", "s3://old/shards#00000000"),  # the same bytes
        "00000001": ("near_duplicate", "s3://old/shards#00000001"),  # 2 bits away
    }


@pytest.mark.parametrize("shared_bits", [0, 9, 60, 64])
def test_close_pairs_finds_every_pair_within_the_threshold(shared_bits: int) -> None:
    """Against all pairs: random hashes sharing their top ``shared_bits`` (a band bucket's
    rows; 64: all identical), with near copies 0-8 bits away and copies of copies."""
    rng = np.random.default_rng(shared_bits)
    base = rng.integers(0, 2**63, 600, dtype=np.uint64) | (rng.integers(0, 2, 600, np.uint64) << 63)
    for _ in range(400):  # copies of earlier hashes, a few bits flipped
        flips = rng.choice(64, rng.integers(0, 9), replace=False)
        copy = base[rng.integers(len(base))] ^ np.uint64(sum(1 << int(b) for b in flips))
        base = np.append(base, copy)
    keep = np.uint64(2**64 - 2 ** (64 - shared_bits)) if shared_bits else np.uint64(0)
    phash = (base & ~keep) | (np.uint64(0xA5A5A5A5A5A5A5A5) & keep)
    for threshold in (0, 3, 6):
        i, j = close_pairs(phash, threshold)
        distance = np.bitwise_count(phash[:, None] ^ phash[None, :])
        a, b = np.nonzero(distance <= threshold)
        want = {(x, y) for x, y in zip(a.tolist(), b.tolist(), strict=True) if x > y}
        assert set(zip(i.tolist(), j.tolist(), strict=True)) == want and len(i) == len(want)
    assert all(len(x) == 0 for x in close_pairs(phash[:1], 6) + close_pairs(phash[:0], 6))
