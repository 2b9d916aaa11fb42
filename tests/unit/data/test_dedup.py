from __future__ import annotations

import random

from mmcore.data.dedup import DedupConfig, find_duplicates
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
