from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmcore.data.metadata import InputConfig, InputError, plan_shards, read_batches, shard_key

ROWS = [
    {"url": f"http://x/{i}.jpg", "caption": f"caption {i}", "license": f"cc-{i}", "status": "x"}
    for i in range(7)
]


def write(path: Path, fmt: str) -> Path:
    match fmt:
        case "parquet":
            pq.write_table(pa.Table.from_pylist(ROWS), path)
        case "csv" | "tsv":
            sep = "," if fmt == "csv" else "\t"
            lines = [sep.join(ROWS[0])] + [sep.join(r.values()) for r in ROWS]
            path.write_text("\n".join(lines) + "\n")
        case "jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


# parquet compresses internally; the text formats also come gzipped.
@pytest.mark.parametrize(
    ("fmt", "gz"),
    [("parquet", False)] + [(f, gz) for f in ("csv", "tsv", "jsonl") for gz in (False, True)],
)
def test_formats(tmp_path: Path, fmt: str, gz: bool) -> None:
    path = write(tmp_path / f"meta.{fmt}", fmt)
    if gz:
        gz_path = path.with_name(path.name + ".gz")
        gz_path.write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
        path = gz_path
    table = pa.concat_tables(read_batches(InputConfig(path=str(path))))
    assert table.column_names == ["url", "caption", "license", "src_status"]
    assert table.column("caption").to_pylist() == [r["caption"] for r in ROWS]


def test_missing_column_and_bad_input_fail_clearly(tmp_path: Path) -> None:
    path = write(tmp_path / "m.csv", "csv")
    with pytest.raises(InputError, match=r"missing column\(s\) \['text'\]"):
        next(read_batches(InputConfig(path=str(path), caption_col="text")))
    with pytest.raises(InputError, match="does not exist"):
        next(read_batches(InputConfig(path=str(tmp_path / "nope.csv"))))
    (tmp_path / "m.xyz").write_text("?")
    with pytest.raises(InputError, match="--input-format"):
        next(read_batches(InputConfig(path=str(tmp_path / "m.xyz"))))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="cannot read"):
        next(read_batches(InputConfig(path=str(tmp_path / "broken.parquet"))))


def test_invalid_utf8_captions_are_kept_with_replacement(tmp_path: Path) -> None:
    path = tmp_path / "m.tsv"
    path.write_bytes(b'url\tcaption\nhttp://x/1.jpg\ta caf\xe9 "quoted\n')
    table = pa.concat_tables(read_batches(InputConfig(path=str(path))))
    assert table.column("caption").to_pylist() == ['a caf\ufffd "quoted']


def test_folder_input_reads_files_in_order(tmp_path: Path) -> None:
    write(tmp_path / "b.parquet", "parquet")
    write(tmp_path / "a.parquet", "parquet")
    table = pa.concat_tables(read_batches(InputConfig(path=str(tmp_path))))
    assert len(table) == 14


def test_plan_keys_and_parts(tmp_path: Path) -> None:
    path = write(tmp_path / "m.parquet", "parquet")
    plan = plan_shards(InputConfig(path=str(path)), tmp_path / "parts", 3, rows_per_part=2)
    assert plan.n_rows == 7 and plan.shard_rows == [3, 3, 1]
    parts = [pq.read_table(p) for p in plan.parts]
    assert [Path(p).name for p in plan.parts] == [
        "00000_0000.parquet", "00000_0001.parquet", "00001_0000.parquet",
        "00001_0001.parquet", "00002_0000.parquet",
    ]  # fmt: skip
    keys = [k for t in parts for k in t.column("key").to_pylist()]
    assert keys == ["000000", "000001", "000002", "000010", "000011", "000012", "000020"]
    assert all(len(set(t.column("shard").to_pylist())) == 1 for t in parts)  # never across
    assert shard_key(12, 7, 10_000) == "000120007"


def test_questions_join_by_url_and_bad_ones_fail_first(tmp_path: Path) -> None:
    meta = write(tmp_path / "meta.parquet", "parquet")
    qa = tmp_path / "qa.jsonl"
    pairs = [{"url": "http://x/1.jpg", "question": "what colour?", "answer": "red", "type": "c"},
             {"url": "http://x/1.jpg", "question": "how many?", "answer": "one"},
             {"url": "http://elsewhere/9.jpg", "question": "q", "answer": "a"}]  # fmt: skip
    qa.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (table,) = read_batches(InputConfig(path=str(meta), qa=str(qa)))
    joined = [json.loads(v) for v in table.column("qa").to_pylist()]
    assert joined[1] == [{"question": "what colour?", "answer": "red", "type": "c"},
                         {"question": "how many?", "answer": "one", "type": ""}]  # fmt: skip
    assert all(v == [] for i, v in enumerate(joined) if i != 1)

    qa.write_text(json.dumps({"url": "http://x/1.jpg", "question": "q"}) + "\n")
    with pytest.raises(InputError, match=r"input.qa .*missing column\(s\) \['answer'\]"):
        next(read_batches(InputConfig(path=str(meta), qa=str(qa))))
    with pytest.raises(InputError, match="input.qa"):
        next(read_batches(InputConfig(path=str(meta), qa=str(tmp_path / "none.parquet"))))
    pq.write_table(pa.Table.from_pylist([ROWS[0] | {"qa": "[]"}]), clash := tmp_path / "c.parquet")
    with pytest.raises(InputError, match="has a qa column already"):
        next(read_batches(InputConfig(path=str(clash), qa=str(meta))))
