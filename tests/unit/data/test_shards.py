from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmcore.data.shards import (
    build_manifest,
    file_sha256,
    finalize_shard,
    finished_shards,
    staged_rows,
    write_pieces,
)


def jpeg(colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, "JPEG")
    return buf.getvalue()


def staged(keys: list[str], status: list[str]) -> pa.Table:
    n = len(keys)
    ok = [s == "success" for s in status]
    shas = [f"h{k}" if o else "" for k, o in zip(keys, ok, strict=True)]
    return pa.table({
        "key": keys, "shard": [0] * n, "url": [f"u{k}" for k in keys],
        "caption": [f"caption {k}" for k in keys], "license": ["cc"] * n,
        "status": status, "error_message": ["" if o else "HTTP 404" for o in ok],
        "image": [jpeg("red") if o else None for o in ok],
        "width": [8] * n, "height": [8] * n, "original_width": [8] * n,
        "original_height": [8] * n, "sha256": shas,
        "phash": pa.array([2**63 + 5] * n, pa.uint64()), "thumb": [b"\0" * 48] * n,
    })  # fmt: skip


def test_pieces_to_shard(tmp_path: Path) -> None:
    pieces, out = tmp_path / "pieces", tmp_path / "out"
    pieces.mkdir(), out.mkdir()
    write_pieces(staged(["00000002", "00000003"], ["success", "success"]), pieces)
    summary = write_pieces(
        staged(["00000000", "00000001"], ["success", "failed_to_download"]), pieces
    )
    assert summary["shard"].tolist() == [0] and summary["rows"].tolist() == [2]
    assert summary["kept"].tolist() == [1]
    assert staged_rows(pieces) == {0: 4}

    dropped = {"00000003": ("duplicate", "00000000")}
    stats = finalize_shard(0, pieces, out, dropped, "jpg")
    assert stats["count"] == 4 and stats["successes"] == 2
    assert stats["status_counts"] == {"duplicate": 1, "failed_to_download": 1, "success": 2}
    rows = pq.read_table(out / "00000.parquet").to_pylist()
    assert [r["key"] for r in rows] == ["00000000", "00000001", "00000002", "00000003"]
    assert (
        rows[3]["duplicate_of"] == "00000000"
        and rows[3]["error_message"] == "duplicate of 00000000"
    )
    assert rows[0]["license"] == "cc" and rows[0]["phash"] == 2**63 + 5
    with tarfile.open(out / "00000.tar") as tar:
        names = tar.getnames()
        meta = json.load(tar.extractfile("00000000.json"))
    assert names == [f"0000000{i}.{e}" for i in (0, 2) for e in ("jpg", "txt", "json")]
    assert meta["license"] == "cc" and meta["phash"] == "8000000000000005"
    assert stats["sha256"] == file_sha256(out / "00000.tar")
    assert not list(out.glob(".*"))  # no temporary files left

    first = (out / "00000.tar").read_bytes()
    finalize_shard(0, pieces, out, dropped, "jpg")
    assert (out / "00000.tar").read_bytes() == first  # byte-for-byte reproducible

    manifest = build_manifest({"k": 1}, list(finished_shards(out).values()))
    assert manifest["n_input"] == 4 and manifest["n_samples"] == 2
    assert manifest["shards"][0]["sha256"] == stats["sha256"] and len(manifest["digest"]) == 64


def test_a_shard_carries_the_models_scores_and_its_reasons(tmp_path: Path) -> None:
    pieces, out = tmp_path / "pieces", tmp_path / "out"
    keys = ["00000000", "00000001", "00000002"]
    write_pieces(staged(keys, ["success", "success", "failed_to_download"]), pieces)
    dropped = {"00000001": ("low_alignment", None, "alignment 0.1000 below the cut-off 0.5")}
    stats = finalize_shard(0, pieces, out, dropped, "jpg", {"00000000": 0.75, "00000001": 0.1})
    assert stats["status_counts"] == {"failed_to_download": 1, "low_alignment": 1, "success": 1}
    table = pq.read_table(out / "00000.parquet")
    assert table.column_names.index("alignment") == table.column_names.index("duplicate_of") + 1
    rows = table.to_pylist()
    assert [r["alignment"] for r in rows] == [0.75, pytest.approx(0.1), None]
    assert rows[1]["error_message"] == "alignment 0.1000 below the cut-off 0.5"
    assert rows[1]["duplicate_of"] is None
    with tarfile.open(out / "00000.tar") as tar:
        assert json.load(tar.extractfile("00000000.json"))["alignment"] == 0.75
