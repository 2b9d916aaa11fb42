from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mmcore.data.sample import COLOURS, JUNK, SHAPES, heldout, make_sample_data


def test_reproducible_with_known_junk_counts(tmp_path: Path) -> None:
    a = make_sample_data(tmp_path / "a", n=300, seed=3)
    b = make_sample_data(tmp_path / "b", n=300, seed=3)
    assert a == b
    ta, tb = (pq.read_table(tmp_path / d / "metadata.parquet") for d in "ab")
    assert ta.column("caption").equals(tb.column("caption"))
    for name in ta.column("file").to_pylist()[:50]:
        pa_, pb = tmp_path / "a" / "images" / name, tmp_path / "b" / "images" / name
        assert pa_.exists() == pb.exists() and (
            not pa_.exists() or pa_.read_bytes() == pb.read_bytes()
        )
    kinds = ta.column("kind").to_pylist()
    assert len(kinds) == 300 and a["counts"] == {k: kinds.count(k) for k in a["counts"]}
    assert set(JUNK) < set(kinds) and all(a["counts"][k] == 6 for k in JUNK)
    assert json.loads((tmp_path / "a" / "sample_info.json").read_text()) == a


def test_heldout_compositions_never_appear_in_the_crawl(tmp_path: Path) -> None:
    info = make_sample_data(tmp_path, n=300, seed=0)
    assert all(any(heldout(c, s) for s in SHAPES) for c in COLOURS)
    assert all(any(heldout(c, s) for c in COLOURS) for s in SHAPES)
    captions = pq.read_table(tmp_path / "metadata.parquet").column("caption").to_pylist()
    for combo in info["heldout"]:
        assert not any(combo in c for c in captions), combo
    for task in ("colour", "shape"):
        classes = sorted(p.name for p in (tmp_path / "zeroshot" / task).iterdir())
        assert classes == sorted(COLOURS if task == "colour" else SHAPES)
        assert all(
            len(list((tmp_path / "zeroshot" / task / c).glob("*.png"))) == 40 for c in classes
        )


def test_noisy_rows_carry_another_scenes_caption_and_nothing_else_changes(tmp_path: Path) -> None:
    plain = make_sample_data(tmp_path / "plain", n=300, seed=4, zeroshot_per_class=1)
    noisy = make_sample_data(tmp_path / "noisy", n=300, seed=4, zeroshot_per_class=1, noisy=0.3)
    a, b = (pq.read_table(tmp_path / d / "metadata.parquet").to_pylist() for d in ("plain",
            "noisy"))  # fmt: skip
    assert [r["file"] for r in a] == [r["file"] for r in b]  # the same images, in order
    changed = [(x, y) for x, y in zip(a, b, strict=True) if x["kind"] != y["kind"]]
    assert len(changed) == noisy["counts"]["noisy"] == round(0.3 * plain["counts"]["clean"])
    for x, y in zip(a, b, strict=True):  # copies of a noisy row repeat its caption
        assert x["caption"] == y["caption"] or y["kind"] in ("noisy", "duplicate",
                                                             "near_duplicate")  # fmt: skip
    assert noisy["counts"]["clean"] + len(changed) == plain["counts"]["clean"]
    assert noisy["expected_status"]["noisy"] == "low_alignment" and "noisy" not in plain["counts"]
    for x, y in changed:
        assert x["kind"] == "clean" and y["kind"] == "noisy" and x["caption"] != y["caption"]
        # the first object named: another colour and another shape than the image's
        for vocabulary in (COLOURS, SHAPES):
            was, now = (_first(c["caption"], vocabulary) for c in (x, y))
            assert was is None or now is None or was != now
    for name in (r["file"] for r in a[:40]):
        assert (tmp_path / "plain/images" / name).read_bytes() == (
            tmp_path / "noisy/images" / name
        ).read_bytes()


def _first(caption: str, vocabulary) -> str | None:
    return next((w for w in caption.split() if w in vocabulary), None)


def test_questions_match_the_scenes_and_the_heldout_shard(tmp_path: Path) -> None:
    info = make_sample_data(tmp_path / "a", n=300, seed=5, zeroshot_per_class=1, heldout_n=40)
    meta = {r["url"]: r for r in pq.read_table(tmp_path / "a" / "metadata.parquet").to_pylist()}
    qa = pq.read_table(tmp_path / "a" / "qa.parquet").to_pylist()
    assert len(qa) == info["qa"]["pairs"] and set(info["qa"]["by_type"]) == {
        "colour", "shape", "where", "count"}  # fmt: skip
    asked = {r["url"] for r in qa}
    assert asked == {u for u, r in meta.items() if r["kind"] in ("clean", "noisy", "html_caption")}
    sides = {"to the left of": ("left", "right"), "to the right of": ("right", "left"),
             "above": ("top", "bottom"), "below": ("bottom", "top")}  # fmt: skip
    for row in (r for r in qa if meta[r["url"]]["kind"] == "clean"):
        caption = meta[row["url"]]["caption"]
        relation = next((k for k in sides if k in caption), None)
        if row["type"] == "count":
            assert row["answer"] == ("two" if relation else "one")
        if row["type"] == "where" and relation:  # the caption's relation, from each side
            first, second = caption.split(f" {relation} ")
            named = first if row["question"].split(" is the ")[1][:-1] in first else second
            assert row["answer"] == sides[relation][named is second]
        named_colour = any(c in caption.split() for c in COLOURS)
        if row["type"] == "colour" and relation is None and named_colour:
            assert row["answer"] in caption  # a single object: its colour, when named

    with tarfile.open(tmp_path / "a" / "heldout" / "00000.tar") as tar:
        metas = [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
    assert len(metas) == 40
    for m in metas:  # the first object of every scene is a held-out composition
        assert any(combo in m["caption"].split(" to the ")[0].split(" above ")[0].split(
            " below ")[0] for combo in info["heldout"])  # fmt: skip
        assert "count" in {q["type"] for q in m["qa"]}
    # the held-out shard has its own random stream: the crawl is the same without it
    make_sample_data(tmp_path / "b", n=300, seed=5, zeroshot_per_class=1, heldout_n=0)
    a, b = (pq.read_table(tmp_path / d / "metadata.parquet").drop_columns("url") for d in "ab")
    assert a.equals(b)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--n", "0"], "n=0 is too small"),
        (["--seed", "-1"], "seed=-1 must be >= 0"),  # numpy's traceback before
        (["--min-px", "0"], "need 1 <= min_px <= max_px"),  # Pillow's "cannot write empty image"
        (["--min-px", "300"], "need 1 <= min_px <= max_px"),
        (["--noisy", "1"], "noisy=1.0 must be in [0, 1)"),
    ],
)
def test_sample_data_refuses_bad_flags_before_writing(tmp_path: Path, capsys, flags, message):
    from pipelines.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["sample-data", str(tmp_path / "out"), *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
