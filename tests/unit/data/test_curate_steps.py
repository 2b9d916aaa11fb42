"""The pure curation steps on the sample crawl: every junk kind ends with its status."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from mmcore.data.captions import CaptionConfig
from mmcore.data.curate import clean_captions, fetch_images, process_images
from mmcore.data.dedup import DedupConfig, find_duplicates
from mmcore.data.fetch import FetchConfig
from mmcore.data.images import ImageConfig


def test_every_row_gets_the_status_of_its_kind(sample_dir: Path) -> None:
    table = pq.read_table(sample_dir / "metadata.parquet")
    batch = {c: np.asarray(table.column(c).to_pylist(), dtype=object) for c in table.column_names}
    batch["key"] = np.asarray([f"{i:05d}" for i in range(len(table))], dtype=object)
    batch = clean_captions(batch, CaptionConfig())
    batch = fetch_images(batch, FetchConfig())
    batch = process_images(batch, ImageConfig(image_size=32))
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
