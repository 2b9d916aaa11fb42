"""The pure curation steps on the sample crawl: every junk kind ends with its status."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from mmcore.data.captions import CaptionConfig
from mmcore.data.curate import clean_captions, fetch_and_process
from mmcore.data.dedup import DedupConfig, find_duplicates
from mmcore.data.fetch import FetchConfig
from mmcore.data.images import ImageConfig


def test_every_row_gets_the_status_of_its_kind(sample_dir: Path) -> None:
    table = pq.read_table(sample_dir / "metadata.parquet")
    batch = {c: np.asarray(table.column(c).to_pylist(), dtype=object) for c in table.column_names}
    batch["key"] = np.asarray([f"{i:05d}" for i in range(len(table))], dtype=object)
    batch = clean_captions(batch, CaptionConfig())
    batch = fetch_and_process(batch, FetchConfig(), ImageConfig(image_size=32))
    ok = batch["status"] == "success"
    dropped = find_duplicates(
        *(list(batch[c][ok]) for c in ("key", "sha256", "phash", "thumb")), DedupConfig()
    )
    status = [dropped.get(k, (s,))[0] for k, s in zip(batch["key"], batch["status"], strict=True)]
    expected = json.loads((sample_dir / "sample_info.json").read_text())["expected_status"]
    wrong = collections.Counter(
        (kind, s) for kind, s in zip(batch["kind"], status, strict=True) if s != expected[kind]
    )
    assert not wrong
    assert all(batch["error_message"][i] for i, s in enumerate(batch["status"]) if s != "success")
    kept = [i for i, s in enumerate(status) if s == "success"]
    assert all(batch["image"][i][:2] == b"\xff\xd8" for i in kept)  # JPEG output
    assert all(batch["caption"][i] == batch["caption"][i].strip() for i in kept)


def test_an_unexpected_error_on_one_image_is_recorded_not_raised(
    tmp_path: Path, monkeypatch
) -> None:
    """Fault injection: a bug that raises on one image costs that row only, with its reason."""
    import mmcore.data.curate as curate
    from mmcore.data.sample import make_sample_data

    make_sample_data(tmp_path, n=150, seed=2)
    rows = pq.read_table(tmp_path / "metadata.parquet").to_pylist()
    urls = [r["url"] for r in rows if r["kind"] == "clean"][:5]
    real = curate.process_image

    def flaky(data: bytes, cfg: ImageConfig):
        if data == Path(urls[2]).read_bytes():
            raise ZeroDivisionError("injected")
        return real(data, cfg)

    monkeypatch.setattr(curate, "process_image", flaky)
    batch = {
        "url": np.asarray(urls, dtype=object),
        "status": np.asarray(["success"] * 5, dtype=object),
        "error_message": np.asarray([""] * 5, dtype=object),
    }
    out = fetch_and_process(batch, FetchConfig(), ImageConfig(image_size=32))
    assert list(out["status"]) == ["success", "success", "failed_to_process", "success", "success"]
    assert "ZeroDivisionError('injected')" in out["error_message"][2]
    assert out["image"][2] is None and out["image"][3] is not None
