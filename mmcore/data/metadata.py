"""Read (url, caption, extra columns) metadata and split it into shard inputs.

Inputs are parquet, csv, tsv or jsonl files (csv/tsv/jsonl may be gzipped), or a folder (a
prefix in a bucket) of them, local or in object storage (``mmcore.storage``), read batch by
batch with pyarrow: the whole table is never held in memory. Planning
assigns every input row a key ``SSSSSIII`` (shard number, index in the shard, img2dataset's
scheme) and writes the rows as small parquet "parts" that the curation job reads.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.json as pjson
import pyarrow.parquet as pq

from mmcore import storage
from mmcore.config import ConfigError

InputFormat = Literal["parquet", "csv", "tsv", "jsonl"]
# Columns that the job writes itself; an input column of the same name is kept as src_<name>.
RESERVED = (
    "key shard part url caption status error_message width height original_width "
    "original_height sha256 phash duplicate_of image"
).split()
SHARD_DIGITS = 5


class InputError(ConfigError):
    """Unusable input: missing file or column, unknown format. Raised before any work."""


@dataclasses.dataclass(kw_only=True)
class InputConfig:
    """Where the (url, caption) rows come from; img2dataset's names and defaults."""

    path: str = ""  # a file, or a folder (bucket prefix) of files of one format
    format: InputFormat | None = None  # default: from the file extension
    url_col: str = "url"
    caption_col: str = "caption"
    # Question-answer pairs about the images (``mmray sample-data``'s qa.parquet): a file of
    # any input format with url, question, answer and optional type columns, read whole and
    # joined to the rows by url as a ``qa`` column: the JSON text of a list of {question,
    # answer, type} (text passes every stage's batch format unchanged), which each kept
    # sample's KEY.json carries as that list. Rows without questions get "[]".
    qa: str = ""


@dataclasses.dataclass
class Plan:
    n_rows: int
    shard_rows: list[int]  # input rows per shard
    parts: list[str]  # part files, in key order


def input_files(cfg: InputConfig, name: str = "input") -> tuple[list[str], InputFormat]:
    """The files to read and their format; raises ``InputError``."""
    if not cfg.path:
        raise InputError("no input: pass --input")
    try:
        storage.check_readable(name, cfg.path)
    except ConfigError as e:
        raise InputError(str(e)) from e
    if storage.is_dir(cfg.path):
        files = [p for p in storage.list_files(cfg.path) if _guess_format(p)]
        fmt = cfg.format or (_guess_format(files[0]) if files else None)
        files = [p for p in files if _guess_format(p) == fmt]
    else:
        files, fmt = [storage.absolute(cfg.path)], cfg.format or _guess_format(cfg.path)
    if fmt is None:
        raise InputError(f"cannot tell the format of {cfg.path!r}: pass --input-format")
    if not files:
        raise InputError(f"no {fmt} files in {cfg.path!r}")
    return files, fmt


_EXTENSIONS: dict[str, InputFormat] = {
    "parquet": "parquet", "csv": "csv", "tsv": "tsv", "jsonl": "jsonl", "json": "jsonl"
}  # fmt: skip


def _guess_format(path: str) -> InputFormat | None:
    suffixes = [s.lower() for s in Path(storage.name(path)).suffixes]
    suffixes = [s for s in suffixes if s not in (".gz", ".gzip")]
    ext = suffixes[-1].lstrip(".") if suffixes else ""
    return _EXTENSIONS.get(ext)


def read_batches(cfg: InputConfig, batch_rows: int = 4096) -> Iterator[pa.Table]:
    """Stream the input as tables with string ``url`` and ``caption`` columns first.

    Every file's columns are checked before the first batch is yielded, so a missing column
    fails before any work starts.
    """
    files, fmt = check_input(cfg)
    qa = read_qa(cfg.qa) if cfg.qa else None
    for path in files:
        for batch in _file_batches(path, fmt, cfg, batch_rows):
            table = _normalise(pa.Table.from_batches([batch]), cfg)
            if qa is not None:
                pairs = [json.dumps(qa.get(url, [])) for url in table.column("url").to_pylist()]
                table = table.append_column("qa", pa.array(pairs, pa.string()))
            yield table


def check_input(cfg: InputConfig) -> tuple[list[str], InputFormat]:
    """Check that every input file is readable and has the url and caption columns."""
    files, fmt = input_files(cfg)
    for path in files:
        names = _schema_names(path, fmt)
        _check_columns(path, names, cfg)
        if cfg.qa and "qa" in names:
            raise InputError(f"{path} has a qa column already: drop it or input.qa")
    if cfg.qa:
        _qa_files(cfg.qa)
    return files, fmt


def _qa_files(path: str) -> tuple[list[str], InputFormat]:
    files, fmt = input_files(InputConfig(path=path), "input.qa")
    for file in files:
        names = _schema_names(file, fmt)
        if missing := [c for c in ("url", "question", "answer") if c not in names]:
            raise InputError(f"input.qa {file}: missing column(s) {missing}; it has {names}")
    return files, fmt


def read_qa(path: str) -> dict[str, list[dict[str, str]]]:
    """``input.qa``'s pairs by url, in file order: {url: [{question, answer, type}, ...]}."""
    files, fmt = _qa_files(path)
    by_url: dict[str, list[dict[str, str]]] = {}
    for file in files:
        for batch in _file_batches(file, fmt, None, 65_536):
            for row in batch.to_pylist():
                qa = {k: str(row.get(k) or "") for k in ("question", "answer", "type")}
                by_url.setdefault(str(row["url"]), []).append(qa)
    return by_url


def _schema_names(path: str, fmt: InputFormat) -> list[str]:
    try:
        if fmt == "parquet":
            with storage.open_input(path) as f:
                return pq.ParquetFile(f).schema_arrow.names
        return next(iter(_file_batches(path, fmt, None, 1)), pa.record_batch([])).schema.names
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"cannot read {path} as {fmt}: {e}") from e


def _check_columns(path: str, names: list[str], cfg: InputConfig) -> None:
    missing = [c for c in (cfg.url_col, cfg.caption_col) if c not in names]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {missing}; it has {names}. "
            "Set --url-col / --caption-col to the right names."
        )


def _file_batches(
    path: str, fmt: InputFormat, cfg: InputConfig | None, batch_rows: int
) -> Iterator[pa.RecordBatch]:
    fs, inner = storage.resolve(path)
    if fmt == "parquet":
        with fs.open_input_file(inner) as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=batch_rows)
        return
    stream = fs.open_input_stream(inner, compression="detect")  # .gz by its extension
    if fmt == "jsonl":
        with stream:
            yield from pjson.open_json(stream)
        return
    delimiter = "," if fmt == "csv" else "\t"
    convert = pcsv.ConvertOptions(check_utf8=False)
    if cfg is not None:  # every column as text; the caption as bytes (may be invalid UTF-8)
        names = _schema_names(path, fmt)
        types = {n: pa.string() for n in names} | {cfg.caption_col: pa.binary()}
        convert = pcsv.ConvertOptions(column_types=types, check_utf8=False)
    parse = pcsv.ParseOptions(delimiter=delimiter, quote_char='"' if fmt == "csv" else False)
    with stream:
        yield from pcsv.open_csv(stream, parse_options=parse, convert_options=convert)


def _normalise(table: pa.Table, cfg: InputConfig) -> pa.Table:
    """url and caption as strings (invalid UTF-8 replaced), then extras, renamed if reserved."""
    url = _as_text(table.column(cfg.url_col))
    caption = _as_text(table.column(cfg.caption_col))
    cols, names = [url, caption], ["url", "caption"]
    for name in table.column_names:
        if name in (cfg.url_col, cfg.caption_col):
            continue
        cols.append(table.column(name))
        names.append(f"src_{name}" if name in RESERVED else name)
    return pa.table(cols, names=names)


def _as_text(col: pa.ChunkedArray) -> pa.Array:
    def text(v: object) -> str:
        if isinstance(v, bytes):
            return v.decode("utf-8", errors="replace")
        return "" if v is None else str(v)

    return pa.array([text(v) for v in col.to_pylist()], pa.string())


def shard_key(shard: int, index: int, samples_per_shard: int) -> str:
    """img2dataset's key: zero-padded shard number, then the index within the shard."""
    return f"{shard:0{SHARD_DIGITS}d}{index:0{len(str(samples_per_shard - 1))}d}"


def plan_shards(cfg: InputConfig, out_dir: str, samples_per_shard: int, rows_per_part: int) -> Plan:
    """Write the input as parquet parts of at most ``rows_per_part`` rows, keyed by shard.

    A part never crosses a shard boundary; parts are named ``SSSSS_PPPP.parquet``.
    """
    plan = Plan(n_rows=0, shard_rows=[], parts=[])
    pending: list[pa.Table] = []
    pending_rows = part = 0

    def flush() -> None:
        nonlocal part
        rows = pa.concat_tables(pending, promote_options="permissive").combine_chunks()
        shard, first = divmod(plan.n_rows, samples_per_shard)
        if shard >= 10**SHARD_DIGITS:
            raise InputError("more than 99999 shards: raise --samples-per-shard")
        if first == 0:
            plan.shard_rows.append(0)
            part = 0
        keys = [shard_key(shard, i, samples_per_shard) for i in range(first, first + len(rows))]
        rows = rows.add_column(0, "key", pa.array(keys, pa.string()))
        rows = rows.add_column(1, "shard", pa.array([shard] * len(rows), pa.int32()))
        path = storage.join(out_dir, f"{shard:0{SHARD_DIGITS}d}_{part:04d}.parquet")
        storage.write_parquet(path, rows)
        plan.parts.append(path)
        plan.shard_rows[-1] += len(rows)
        plan.n_rows += len(rows)
        part += 1

    for table in read_batches(cfg):
        while table.num_rows:
            left_in_shard = samples_per_shard - plan.n_rows % samples_per_shard
            room = min(rows_per_part, left_in_shard) - pending_rows
            take = min(table.num_rows, room)
            pending.append(table.slice(0, take))
            pending_rows += take
            table = table.slice(take)
            if take == room:
                flush()
                pending, pending_rows = [], 0
    if pending_rows:
        flush()
    return plan


def read_parts(batch: dict[str, np.ndarray]) -> pa.Table:
    """``{"part": [path, ...]}`` → the rows of those planned parts."""
    return pa.concat_tables(storage.read_parquet(str(p)) for p in batch["part"])
