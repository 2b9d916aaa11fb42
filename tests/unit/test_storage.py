"""mmcore.storage on a local disk (object storage: tests/integration/test_object_storage.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow as pa
import pytest

from mmcore import storage
from mmcore.config import ConfigError


def test_local_paths_become_absolute_and_uris_stay_as_given(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("shards") == str(tmp_path / "shards")
    assert storage.absolute("s3://bucket/shards/") == "s3://bucket/shards"
    assert storage.join("s3://bucket/shards", "00000.tar") == "s3://bucket/shards/00000.tar"
    assert storage.join("shards", "a", "b") == str(tmp_path / "shards" / "a" / "b")
    assert storage.name("s3://bucket/shards/00000.tar") == "00000.tar"


def test_files_are_written_whole_listed_and_read_back(tmp_path) -> None:
    folder = str(tmp_path / "out")
    storage.write_json(storage.join(folder, "b.json"), {"x": 1})
    storage.write_parquet(storage.join(folder, "a.parquet"), pa.table({"k": [1, 2]}))
    storage.write_text(storage.join(folder, "c.txt"), "hi")
    assert [storage.name(p) for p in storage.list_files(folder)] == ["a.parquet", "b.json", "c.txt"]
    assert storage.list_files(folder, ".json") == [storage.join(folder, "b.json")]
    assert storage.list_files(folder, prefix="a") == [storage.join(folder, "a.parquet")]
    assert storage.read_json(storage.join(folder, "b.json")) == {"x": 1}
    assert storage.read_parquet(storage.join(folder, "a.parquet")).column("k").to_pylist() == [1, 2]
    assert not [p for p in os.listdir(folder) if p.startswith(".")]  # no temporary left
    assert storage.list_files(str(tmp_path / "missing")) == []
    storage.delete_dir(folder)
    assert not storage.exists(folder)
    storage.delete_dir(folder)  # gone already: no error


def test_put_file_moves_a_finished_file_into_place(tmp_path) -> None:
    src = tmp_path / "built.tar"
    src.write_bytes(b"x" * 100)
    dest = storage.join(tmp_path / "shards", "00000.tar")
    storage.put_file(src, dest)
    assert Path(dest).read_bytes() == b"x" * 100 and not src.exists()


def test_a_folder_is_uploaded_into_a_new_folder_and_back(tmp_path) -> None:
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    storage.upload_dir(src, dest := storage.join(tmp_path, "runs", "train-1", "model"))
    storage.download_dir(dest, tmp_path / "copy")
    assert (tmp_path / "copy" / "config.json").read_text() == "{}"


def test_a_failed_write_leaves_no_file_under_its_name(tmp_path) -> None:
    target = tmp_path / "manifest.json"

    def boom(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        storage._replace(str(target), boom)
    assert not target.exists() and not list(tmp_path.iterdir())


def test_a_missing_local_input_is_named_with_its_absolute_path(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"data.path: {tmp_path}/nothing does not exist"):
        storage.check_readable("data.path", "nothing")
    with pytest.raises(ConfigError, match="cannot open nosuch://x"):
        storage.resolve("nosuch://x")
    storage.check_writable("output", "relative/is/fine")  # local folders are made on write


def test_a_download_is_fetched_once_whole_and_shared(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MMRAY_CACHE", str(tmp_path / "cache"))
    fetched = []

    def fetch(tmp: Path) -> Path:
        fetched.append(tmp)
        (tmp / "model").mkdir()
        (tmp / "model" / "w").write_text("weights")
        return tmp / "model"

    first = storage.cached("runs:/abc/model", fetch)
    assert storage.cached("runs:/abc/model", fetch) == first  # the second call fetches nothing
    assert len(fetched) == 1 and (first / "w").read_text() == "weights"
    assert first.parent == tmp_path / "cache" / "downloads"
    assert os.listdir(first.parent) == [first.name]

    def fails(tmp: Path) -> Path:
        (tmp / "half").write_text("x")
        raise OSError("connection reset")

    with pytest.raises(OSError, match="connection reset"):
        storage.cached("runs:/other/model", fails)
    assert os.listdir(first.parent) == [first.name]  # nothing partial left, under any name

    def raced(tmp: Path) -> Path:  # another process renames its copy in while this one fetches
        storage.cached("runs:/raced/model", fetch)
        (tmp / "mine").write_text("same")
        return tmp

    winner = storage.cached("runs:/raced/model", raced)
    assert (winner / "w").read_text() == "weights" and len(os.listdir(first.parent)) == 2

    killed, running = (first.parent / ".partial-killed", first.parent / ".partial-running")
    for folder in (killed, running):
        (folder / "model").mkdir(parents=True)
    os.utime(killed, (0, 0))  # a fetch that was killed long ago
    storage.cached("runs:/next/model", fetch)
    assert not killed.exists() and (running / "model").is_dir()


def test_the_download_cache_drops_what_was_not_used_for_a_month(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MMRAY_CACHE", str(tmp_path))

    def fetch(tmp: Path) -> Path:
        (tmp / "w").write_text("weights")
        return tmp

    month = storage.CACHE_DAYS * 86_400
    old, used = storage.cached("runs:/old/model", fetch), storage.cached("runs:/used/model", fetch)
    for folder in (old, used):
        os.utime(folder, (time.time() - month - 60,) * 2)
    assert storage.cached("runs:/used/model", fetch) == used  # asked for again: its use counts
    storage.cached("runs:/new/model", fetch)  # a new fetch prunes
    assert not old.exists() and (used / "w").read_text() == "weights"
