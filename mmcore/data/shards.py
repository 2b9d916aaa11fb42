"""Shard output: staged pieces → ``NNNNN.tar`` + ``NNNNN.parquet`` + ``NNNNN_stats.json``.

Layout of an output folder (also in README.md):
  NNNNN.tar           KEY.jpg|KEY.webp, KEY.txt, KEY.json for every kept sample, in key order
  NNNNN.parquet       one row for EVERY input row of the shard: key, url, caption, status,
                      error_message, sizes, hashes, duplicate_of, alignment (when a model
                      scored the rows), the input's extra columns
  NNNNN_stats.json    counts by status for the shard, the tar's sha256
  manifest.json       the job's config, counts by status, every shard with count and sha256
The folder may be local or in object storage (``mmcore.storage``). Every file appears whole
(renamed from a temporary name on disk; an object is visible once its upload completes), so
a killed job never leaves a partial file under a final name; ``_stats.json`` is written last
and marks a finished shard, ``manifest.json`` the finished dataset.
Read back with ``read_shards`` (keys, images, captions) or sample by sample with
``tar_samples``; this module needs no torch, so the server's driver imports it cheaply.
Tars are byte-for-byte reproducible (fixed member metadata), so a resumed run produces the
same sha256 as an uninterrupted one.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import io
import itertools
import json
import re
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from mmcore import storage
from mmcore.config import ConfigError

SUCCESS = "success"
STATS_SUFFIX = "_stats.json"
MANIFEST = "manifest.json"
FAILURES = "failures_by_host.csv"  # host × status counts of the rows not kept
SCHEMA_VERSION = 1
# Columns of the per-shard parquet that come before the input's extra columns.
PARQUET_COLUMNS = [
    "key", "url", "caption", "status", "error_message", "width", "height",
    "original_width", "original_height", "sha256", "phash", "thumb", "duplicate_of",
]  # fmt: skip
_INTERNAL = {"shard", "image"}
SHARD_PARQUET = re.compile(r"^[0-9]{5}\.parquet$")


def write_pieces(batch: pa.Table, pieces_dir: str) -> dict[str, np.ndarray]:
    """Stage processed rows, one parquet piece per shard in the batch; returns rows per shard,
    and how many of them succeeded (kept unless dedup drops them)."""
    shards = sorted(set(batch.column("shard").to_pylist()))
    counts, kept = [], []
    for shard in shards:
        rows = batch.filter(pc.equal(batch.column("shard"), shard))
        name = f"{shard:05d}_{rows.column('key')[0].as_py()}.parquet"
        storage.write_parquet(storage.join(pieces_dir, name), rows)
        counts.append(len(rows))
        kept.append(pc.sum(pc.equal(rows.column("status"), "success")).as_py() or 0)
    return {"shard": np.asarray(shards, np.int64), "rows": np.asarray(counts, np.int64),
            "kept": np.asarray(kept, np.int64)}  # fmt: skip


def piece_paths(pieces_dir: str, shard: int | None = None) -> list[str]:
    prefix = "" if shard is None else f"{shard:05d}_"
    return storage.list_files(pieces_dir, ".parquet", prefix)


def staged_rows(pieces_dir: str) -> dict[int, int]:
    """Rows staged so far per shard, from parquet footers (no data read)."""
    counts: dict[int, int] = collections.Counter()
    for path in piece_paths(pieces_dir):
        with storage.open_input(path) as f:
            counts[int(storage.name(path)[:5])] += pq.ParquetFile(f).metadata.num_rows
    return dict(counts)


def finalize_shard(
    shard: int,
    pieces_dir: str,
    out_dir: str,
    dropped: Mapping[str, tuple],
    image_ext: str,
    alignment: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Write the shard's tar, parquet and stats from its staged pieces; returns its stats.
    ``dropped``: see ``_mark_dropped``; ``alignment``: the model's score per decoded row, a
    column (after duplicate_of) when given."""
    name = f"{shard:05d}"
    table = pa.concat_tables(storage.read_parquet(p) for p in piece_paths(pieces_dir, shard))
    table = _mark_dropped(table.sort_by("key"), dropped)
    if alignment is not None:
        scores = [alignment.get(k) for k in table.column("key").to_pylist()]
        table = table.append_column("alignment", pa.array(scores, pa.float32()))
    images = table.column("image").to_pylist()
    table = table.drop_columns([c for c in _INTERNAL if c in table.column_names])
    first = PARQUET_COLUMNS + (["alignment"] if alignment is not None else [])
    table = table.select(first + [c for c in table.column_names if c not in first])
    rows = table.to_pylist()

    members = [(r, img) for r, img in zip(rows, images, strict=True) if r["status"] == SUCCESS]
    with tempfile.TemporaryDirectory(prefix="mmray-shard-") as tmp:
        tar = Path(tmp) / f"{name}.tar"
        _write_tar(tar, members, image_ext)
        sha256, size = file_sha256(tar), tar.stat().st_size
        storage.put_file(tar, storage.join(out_dir, tar.name))
    storage.write_parquet(storage.join(out_dir, f"{name}.parquet"), table)
    counts = collections.Counter(row["status"] for row in rows)
    failures: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for row in rows:
        if row["status"] != SUCCESS:
            failures[host_of(row["url"])][row["status"]] += 1
    stats = {
        "shard": name,
        "tar": f"{name}.tar",
        "parquet": f"{name}.parquet",
        "count": len(rows),
        "successes": counts.get(SUCCESS, 0),
        "status_counts": dict(sorted(counts.items())),
        "sha256": sha256,
        "bytes": size,
        "failures_by_host": {h: dict(sorted(c.items())) for h, c in sorted(failures.items())},
    }
    storage.write_json(storage.join(out_dir, f"{name}{STATS_SUFFIX}"), stats)
    return stats


def sample_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """The ``KEY.json`` member: the sample's metadata and the input's extra columns.

    The phash is written as 16 hex digits: a uint64 does not fit JSON readers' int64; ``qa``
    (``input.qa``'s JSON text) as the list it encodes.
    """
    meta = {k: v for k, v in row.items() if k not in ("error_message", "duplicate_of", "thumb")}
    if isinstance(meta.get("qa"), str):
        meta["qa"] = json.loads(meta["qa"])
    return meta | {"phash": f"{row['phash']:016x}"}


def _write_tar(path: Path, members: list[tuple[dict, bytes]], image_ext: str) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for row, image in members:
            meta = json.dumps(sample_json(row), ensure_ascii=False, default=str).encode()
            add_sample(tar, row["key"], {image_ext: image, "txt": row["caption"].encode(),
                                         "json": meta})  # fmt: skip


def add_sample(tar: tarfile.TarFile, key: str, members: Mapping[str, bytes]) -> None:
    """A sample's ``KEY.EXT`` members, with fixed metadata (the tar is reproducible)."""
    for ext, data in members.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        tar.addfile(info, io.BytesIO(data))


def _mark_dropped(table: pa.Table, dropped: Mapping[str, tuple]) -> pa.Table:
    """Set status, error_message and duplicate_of for the rows dedup (or the model) dropped:
    ``{key: (status, duplicate_of)}`` or ``(status, duplicate_of, error_message)``."""
    status = table.column("status").to_pylist()
    errors = table.column("error_message").to_pylist()
    kept_of: list[str | None] = [None] * len(table)
    for i, key in enumerate(table.column("key").to_pylist()):
        if key in dropped:
            status[i], kept_of[i], *message = dropped[key]
            errors[i] = (message and message[0]) or f"{status[i]} of {kept_of[i]}"
    table = table.set_column(table.schema.get_field_index("status"), "status", pa.array(status))
    idx = table.schema.get_field_index("error_message")
    table = table.set_column(idx, "error_message", pa.array(errors, pa.string()))
    return table.append_column("duplicate_of", pa.array(kept_of, pa.string()))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with storage.open_input(str(path)) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def remove_partial_files(out_dir: str) -> int:
    """Delete temporary files a killed run left on a local disk; returns how many. (A
    bucket holds none: an interrupted upload never becomes an object.)"""
    if not storage.is_local(out_dir):
        return 0
    partial = list(Path(storage.resolve(out_dir)[1]).glob(".*.tmp*"))
    for path in partial:
        path.unlink()
    return len(partial)


def finished_shards(out_dir: str) -> dict[int, dict[str, Any]]:
    """Stats of every shard whose ``_stats.json`` exists (written last: the shard is whole)."""
    return {
        int(storage.name(p)[:5]): storage.read_json(p)
        for p in storage.list_files(out_dir, STATS_SUFFIX)
        if storage.name(p)[:5].isdigit() and len(storage.name(p)) == 5 + len(STATS_SUFFIX)
    }


def build_manifest(config: Mapping[str, Any], shards: list[dict[str, Any]]) -> dict[str, Any]:
    """The dataset's manifest; ``digest`` identifies the data (hash of the shard hashes)."""
    counts: collections.Counter[str] = collections.Counter()
    for s in shards:
        counts.update(s["status_counts"])
    digest = hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()
    return {
        "format": "mmray-webdataset",
        "version": SCHEMA_VERSION,
        "digest": digest,
        "n_input": sum(s["count"] for s in shards),
        "n_samples": counts.get(SUCCESS, 0),
        "status_counts": dict(sorted(counts.items())),
        "shards": [
            {k: s[k] for k in ("shard", "tar", "parquet", "count", "successes", "sha256", "bytes")}
            for s in shards
        ],
        "config": dict(config),
    }


def host_of(url: str) -> str:
    """The host a row's URL names; ``(file)`` for local paths and file:// URLs."""
    return urlparse(url).netloc or "(file)"


def failures_by_host(shards: list[dict[str, Any]]) -> list[tuple[str, dict[str, int]]]:
    """(host, counts by status) of the rows not kept, summed over shards, most failures first
    (ties by host). Every shard's stats hold its own breakdown, so this reads no rows."""
    total: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for s in shards:
        for host, counts in s.get("failures_by_host", {}).items():
            total[host].update(counts)
    ranked = sorted(total.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
    return [(host, dict(sorted(counts.items()))) for host, counts in ranked]


def failures_csv(failures: list[tuple[str, dict[str, int]]]) -> str:
    """``host,status,rows`` lines, most failing hosts first."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["host", "status", "rows"])
    writer.writerows((host, status, n) for host, counts in failures for status, n in counts.items())
    return buf.getvalue()


def read_shards(
    path: str | Path, limit: int | None = None
) -> tuple[list[str], list[Image.Image], list[str]]:
    """Keys, images and captions from curated WebDataset shards (a folder or bucket prefix of
    .tar, or one .tar), local or in object storage."""
    keys, images, captions = [], [], []
    for key, sample in itertools.chain.from_iterable(map(tar_samples, shard_tars(path))):
        keys.append(key)
        images.append(sample_image(sample))
        captions.append(sample["txt"].decode())
        if limit and len(images) >= limit:
            break
    return keys, images, captions


def shard_tars(path: str | Path) -> list[str]:
    """The .tar shards of a folder (bucket prefix), or the one .tar given."""
    path = str(path)
    if storage.is_dir(path):
        tars = storage.list_files(path, ".tar")
    else:
        tars = [path] if path.endswith(".tar") else []
    if not tars:
        raise ConfigError(f"no .tar shards in {storage.absolute(path)}")
    return tars


def sample_image(sample: dict[str, bytes]) -> Image.Image:
    """A sample's image (its ``jpg`` or ``webp`` member), decoded to RGB."""
    return Image.open(io.BytesIO(sample.get("jpg", sample.get("webp")))).convert("RGB")


def tar_samples(tar: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of a WebDataset tar, streamed in order."""
    with storage.open_input(tar) as f, tarfile.open(fileobj=f, mode="r|") as archive:
        key, sample = None, {}
        for member in archive:
            stem, _, ext = member.name.partition(".")
            if stem != key and sample:
                yield key, sample
                sample = {}
            key, sample[ext] = stem, archive.extractfile(member).read()
        if sample:
            yield key, sample
