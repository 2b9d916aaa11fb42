"""Deduplication across a cluster, on Ray Data: the curation job's stage 3.

The staged rows' hash columns (and, with ``dedup.against``, the kept rows of earlier curated
outputs, read from their shard parquet) are grouped by sha256 (exact duplicates: groups of
a few leading hex digits, each handled vectorised) and by phash band (near-duplicate
candidates) in Ray Data shuffles; the near pairs found go to files, and one task replays
the key-order rule over them (the driver holds file names only). A small job does it all in
one task instead. The decisions are written per shard (``SSSSS_*.parquet``: key, status,
duplicate_of) for the finalize tasks. The result equals
``mmcore.data.dedup.find_duplicates`` run in one process.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmcore import storage
from mmcore.config import ConfigError
from mmcore.data.dedup import (
    ORDER_BASE,
    DedupConfig,
    Sources,
    band_rows,
    exact_group,
    near_pairs,
    resolve_near,
)
from mmcore.data.shards import MANIFEST, SHARD_PARQUET, SUCCESS

log = logging.getLogger(__name__)
HASH_COLUMNS = ["key", "status", "sha256", "phash", "thumb"]
ROWS_PER_PARTITION = 500_000


def prior_shards(uri: str) -> list[str]:
    """The shard parquet files of an earlier curated output; ConfigError unless it is one."""
    storage.check_readable("dedup.against", uri)
    if not storage.exists(storage.join(uri, MANIFEST)):
        raise ConfigError(f"dedup.against: {uri} is not a finished curated output (no manifest)")
    files = [p for p in storage.list_files(uri, ".parquet") if SHARD_PARQUET.match(storage.name(p))]
    if not files or "thumb" not in storage.read_parquet_schema(files[0]).names:
        raise ConfigError(
            f"dedup.against: {uri} has no thumbnails in its shard parquet (curated by an older "
            "mmray): curate it again to dedup against it"
        )
    return files


def _read_rows(batch: dict[str, np.ndarray], sources: Sources, partitions: int) -> pa.Table:
    """``{"path": [...], "source": [...]}`` → those files' kept rows: hash columns + order."""
    tables = []
    for path, source in zip(batch["path"], batch["source"], strict=True):
        table = storage.read_parquet(str(path), HASH_COLUMNS)
        table = table.filter(pc.equal(table.column("status"), SUCCESS)).drop_columns(["status"])
        order = sources.order(int(source), table.column("key").to_pylist())
        tables.append(table.append_column("order", pa.array(order, pa.int64())))
    table = pa.concat_tables(tables)
    # The exact stage's group: a few hex digits of the sha256, so each call of exact_group
    # takes many sha256s at once (a call per sha256 cost ~0.5 ms each)
    bucket = [int(sha[:6], 16) % partitions for sha in table.column("sha256").to_pylist()]
    return table.append_column("bucket", pa.array(bucket, pa.int32()))


def _read_survivors(batch: dict[str, np.ndarray]) -> pa.Table:
    return pa.concat_tables(storage.read_parquet(str(p)) for p in batch["path"])


def _files(paths: Sequence[str], **columns: Sequence) -> Any:
    """A dataset of file paths, one task each: Ray's read_parquet costs ~8 s per call here
    (metadata tasks), reading in our own tasks ~0.5 s."""
    import ray.data

    items = [{"path": p} | {k: v[i] for k, v in columns.items()} for i, p in enumerate(paths)]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items)))


def deduplicate(
    cfg: DedupConfig, pieces: Sequence[str], key_width: int, against: Sequence[str], work: str,
    rows_hint: int, one_task_rows: int = 0,
) -> str:  # fmt: skip
    """Find this job's duplicates among the staged ``pieces`` and the ``against`` outputs;
    ``rows_hint``: this job's rows at most. Up to ``one_task_rows`` rows (with the earlier
    outputs'), in one task: the same rules without the shuffles, whose start-up (~7 s here)
    outweighs a small job's work.

    Returns the folder of decisions: ``SSSSS_*.parquet`` (key, status, duplicate_of) for each
    shard with any (``read_decisions``)."""
    priors = {uri: prior_shards(uri) for uri in against}
    widths = [len(storage.read_parquet(files[0], ["key"]).column("key")[0].as_py())
              for files in priors.values()]  # fmt: skip
    sources = Sources(tuple(priors), (*widths, key_width))
    paths = [*pieces, *(p for files in priors.values() for p in files)]
    origin = [sources.current] * len(pieces) + [i for i, f in enumerate(priors.values()) for _ in f]
    survivors, decisions = storage.join(work, "survivors"), storage.join(work, "decisions")
    pairs_dir = storage.join(work, "pairs")
    for folder in (survivors, decisions, pairs_dir):
        storage.delete_dir(folder)
    prior_rows = sum(storage.read_json(storage.join(u, MANIFEST))["n_samples"] for u in priors)
    import ray

    if rows_hint + prior_rows <= one_task_rows:
        task = ray.remote(_in_one_task).remote(cfg, paths, origin, sources, decisions)
        log.info("dedup in one task: %d near pairs, %d near duplicates", *ray.get(task))
        return decisions
    # Ray Data's default of 200 shuffle partitions costs minutes of task overhead on a
    # small job: one partition per ROWS_PER_PARTITION rows.
    parts = max(1, math.ceil((rows_hint + prior_rows) / ROWS_PER_PARTITION))
    rows = _files(paths, source=origin).map_batches(
        _read_rows, fn_kwargs={"sources": sources, "partitions": 4 * parts}, batch_size=None,
        batch_format="numpy",
    )  # fmt: skip
    if cfg.exact:
        grouped = rows.groupby("bucket", num_partitions=parts)
        rows = grouped.map_groups(exact_group, batch_format="numpy")
    kwargs = {"survivors": survivors, "decisions": decisions, "sources": sources}
    written = rows.map_batches(_split, fn_kwargs=kwargs, batch_format="numpy", batch_size=None)
    files = _written(written)
    if cfg.near and files:
        first_current = sources.current * ORDER_BASE
        pairs = (
            _files(files).map_batches(_read_survivors, batch_size=None, batch_format="numpy")
            .map_batches(band_rows, fn_kwargs={"threshold": cfg.phash_threshold},
                         batch_format="numpy")
            .groupby(["band", "value"], num_partitions=parts)
            .map_groups(near_pairs, fn_args=(cfg, first_current), batch_format="numpy")
        )  # fmt: skip
        # The pairs go to files, and one task resolves them: the driver holds none of them.
        pair_files = _written(pairs.map_batches(
            _write_pairs, fn_kwargs={"folder": pairs_dir}, batch_size=None, batch_format="numpy"
        ))  # fmt: skip
        task = ray.remote(_resolve_in_task).remote(pair_files, decisions, sources)
        log.info("dedup: %d near pairs, %d near duplicates", *ray.get(task))
    storage.delete_dir(survivors)
    storage.delete_dir(pairs_dir)
    return decisions


def _write_decisions(
    folder: str, name: str, status: str, dropped: np.ndarray, kept: np.ndarray, sources: Sources
) -> None:
    """Rows ``dropped`` (orders of this job's rows), each a ``status`` of the row ``kept``, as
    one file per shard, ``SSSSS_<name>``: key strings for one shard at a time in memory."""
    digits = sources.widths[sources.current] - 5  # a key: 5 shard digits, then the index
    shards = (dropped % ORDER_BASE) // 10**digits
    for shard in np.unique(shards):
        rows = shards == shard
        write_decisions(folder, int(shard), name, status, [sources.ref(o) for o in dropped[rows]],
                        [sources.ref(o) for o in kept[rows]])  # fmt: skip


def write_decisions(
    folder: str, shard: int, name: str, status: str, keys: Sequence[str],
    duplicate_of: Sequence[str | None], messages: Sequence[str] | None = None,
) -> None:  # fmt: skip
    """One shard's decisions as ``SSSSS_<name>``: key, status, duplicate_of and, when given,
    error_message (otherwise the shard says "STATUS of KEY"); ``read_decisions`` reads them."""
    columns = {"key": pa.array(keys, pa.string()), "status": pa.array([status] * len(keys)),
               "duplicate_of": pa.array(duplicate_of, pa.string())}  # fmt: skip
    if messages is not None:
        columns["error_message"] = pa.array(messages, pa.string())
    storage.write_parquet(storage.join(folder, f"{shard:05d}_{name}"), pa.table(columns))


def _written(ds: Any) -> list[str]:
    """The files a dataset of ``{"file": path or ""}`` rows wrote (none: no rows at all)."""
    return [row["file"] for row in ds.iter_rows() if row["file"]]


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _write_pairs(batch: dict[str, np.ndarray], folder: str) -> dict[str, np.ndarray]:
    """One block of near pairs → a file in ``folder``; returns its path ("" for none)."""
    if not len(batch["later"]):
        return {"file": np.asarray([""])}
    path = storage.join(folder, f"{uuid.uuid4().hex}.parquet")
    storage.write_parquet(path, pa.table({"later": batch["later"], "earlier": batch["earlier"]}))
    return {"file": np.asarray([path])}


def _resolve_in_task(files: list[str], decisions: str, sources: Sources) -> tuple[int, int]:
    tables = [storage.read_parquet(f) for f in files]
    later = _cat([t.column("later").to_numpy() for t in tables])
    earlier = _cat([t.column("earlier").to_numpy() for t in tables])
    del tables
    return _decide_near(later, earlier, decisions, sources)


def _decide_near(
    later: np.ndarray, earlier: np.ndarray, decisions: str, sources: Sources
) -> tuple[int, int]:
    """The key-order rule over the near pairs, written as decisions; returns the numbers of
    pairs and of near duplicates."""
    dropped, match = resolve_near(later, earlier)
    _write_decisions(decisions, "near.parquet", "near_duplicate", dropped, match, sources)
    return len(later), len(dropped)


def _split(
    batch: dict[str, np.ndarray], survivors: str, decisions: str, sources: Sources
) -> dict[str, np.ndarray]:
    """One block after the exact stage: this job's exact duplicates → decision files per
    shard; the rows kept (``dup_of`` -1, or no exact stage) → a survivors file for the near
    stage. Returns that file's path ("" for none)."""
    if not len(batch["order"]):
        return {"file": np.asarray([""])}
    name = f"{int(batch['order'].min())}.parquet"  # unique: every order is in one block only
    kept = _exact_decisions(batch, decisions, name, sources)
    if not kept.any():
        return {"file": np.asarray([""])}
    columns = ("order", "phash", "thumb")
    table = pa.table({c: batch[c][kept] for c in columns})
    storage.write_parquet(path := storage.join(survivors, name), table)
    return {"file": np.asarray([path])}


def _exact_decisions(
    batch: dict[str, np.ndarray], decisions: str, name: str, sources: Sources
) -> np.ndarray:
    """Write this job's exact duplicates among ``batch`` (after ``exact_group``, or all kept
    without it) as decision files named ``SSSSS_<name>``; returns the mask of rows kept."""
    order = batch["order"]
    dup_of = batch.get("dup_of", np.full(len(order), -1, np.int64))
    mine = (dup_of >= 0) & (order >= sources.current * ORDER_BASE)
    _write_decisions(decisions, name, "duplicate", order[mine], dup_of[mine], sources)
    return dup_of < 0


def _in_one_task(
    cfg: DedupConfig, paths: list[str], origin: list[int], sources: Sources, decisions: str
) -> tuple[int, int]:
    """A small job's whole dedup: exact groups, then every kept row against all earlier ones
    (what the band buckets narrow down to candidates), then the key-order rule. Returns the
    numbers of near pairs and near duplicates."""
    table = _read_rows({"path": paths, "source": origin}, sources, partitions=1)
    rows = {c: table.column(c).to_numpy(zero_copy_only=False) for c in ("order", "sha256",
            "phash", "thumb")}  # fmt: skip
    if cfg.exact:
        rows = exact_group(rows)
        kept = _exact_decisions(rows, decisions, "exact.parquet", sources)
        rows = {k: v[kept] for k, v in rows.items()}
    if not cfg.near or not len(rows["order"]):
        return 0, 0
    pairs = near_pairs(rows, cfg, sources.current * ORDER_BASE)
    return _decide_near(pairs["later"], pairs["earlier"], decisions, sources)


def read_decisions(folder: str, shard: int) -> dict[str, tuple[str, str | None, str | None]]:
    """The decisions for one shard (the hash dedup's, and the model stage's when on):
    ``{key: (status, duplicate_of, error_message or None for "STATUS of KEY")}``."""
    out = {}
    for path in storage.list_files(folder, ".parquet", prefix=f"{shard:05d}_"):
        for row in storage.read_parquet(path).to_pylist():
            out[row["key"]] = (row["status"], row["duplicate_of"], row.get("error_message"))
    return out
