"""Paths that are local folders or object storage URIs, through ``pyarrow.fs``.

Every path a user gives mmray may be a local path or a URI that ``pyarrow.fs`` resolves:
``s3://bucket/prefix`` (credentials, region and endpoint the standard AWS way:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``
for an S3-compatible store such as MinIO), ``gs://``, ``hdfs://``, ``file://``. A local path
is made absolute here, once, so that a Ray task whose working directory differs from the
driver's (a worker on a cluster the job joined) reads the same file.

Object stores have no rename. ``write_bytes`` and ``put_file`` make a file appear whole or
not at all: locally through a temporary name and a rename, in a bucket because an object
is visible only once its upload completes. Readers of a multi-file output therefore rely on
a marker written last (a shard's ``_stats.json``, a dataset's ``manifest.json``).

Copies of remote models and indexes live in one cache per machine (``cached``), fetched once
and shared by every process there, instead of a temporary folder per process that a killed
Ray worker would leave behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mmcore.config import ConfigError

_COPY_CHUNK = 8 << 20


def is_uri(path: str) -> bool:
    return "://" in str(path)


def is_local(path: str) -> bool:
    return not is_uri(path) or str(path).startswith("file://")


def absolute(path: str | Path) -> str:
    """A local path made absolute; a URI as given (without a trailing slash)."""
    path = str(path)
    return path.rstrip("/") if is_uri(path) else str(Path(path).expanduser().resolve())


def join(base: str | Path, *names: str) -> str:
    return "/".join([absolute(base), *names])


def name(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def resolve(path: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it). Local paths resolve to absolute ones."""
    path = str(path)
    if not is_uri(path):
        return pafs.LocalFileSystem(), absolute(path)
    try:
        return pafs.FileSystem.from_uri(path)
    except (ValueError, OSError) as e:  # an unknown scheme, a malformed URI
        raise ConfigError(f"cannot open {path}: {e}") from e


def info(path: str) -> pafs.FileInfo:
    fs, inner = resolve(path)
    return fs.get_file_info(inner)


def exists(path: str) -> bool:
    return info(path).type != pafs.FileType.NotFound


def is_file(path: str) -> bool:
    return info(path).type == pafs.FileType.File


def is_dir(path: str) -> bool:
    """A local folder, or a prefix with objects under it in a bucket."""
    return info(path).type == pafs.FileType.Directory


def list_files(folder: str, suffix: str = "", prefix: str = "") -> list[str]:
    """The files directly in ``folder`` whose names match, sorted, as full paths (URIs keep
    their scheme); empty when the folder does not exist."""
    fs, inner = resolve(folder)
    entries = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    names = sorted(
        name(e.path) for e in entries
        if e.type == pafs.FileType.File and name(e.path).endswith(suffix)
        and name(e.path).startswith(prefix)
    )  # fmt: skip
    return [join(folder, n) for n in names]


def read_bytes(path: str) -> bytes:
    fs, inner = resolve(path)
    with fs.open_input_stream(inner) as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode()


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


def open_input(path: str) -> Any:
    """A seekable file for readers such as ``pyarrow.parquet`` and ``tarfile``."""
    fs, inner = resolve(path)
    return fs.open_input_file(inner)


def write_bytes(path: str, data: bytes) -> None:
    """Write ``path`` whole: a reader sees the old content, or none, or all of ``data``."""
    fs, inner = resolve(path)
    if isinstance(fs, pafs.LocalFileSystem):
        _replace(inner, lambda tmp: tmp.write_bytes(data))
        return
    with fs.open_output_stream(inner) as f:  # the object appears when the upload completes
        f.write(data)


def _replace(path: str, write: Callable[[Path], Any]) -> None:
    """``write`` a temporary file beside ``path``, then rename it to ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def read_parquet(path: str, columns: list[str] | None = None) -> pa.Table:
    fs, inner = resolve(path)
    return pq.read_table(inner, columns=columns, filesystem=fs)


def read_parquet_schema(path: str) -> pa.Schema:
    with open_input(path) as f:
        return pq.ParquetFile(f).schema_arrow


def write_parquet(path: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(path, buf.getvalue())


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def put_file(local: str | Path, path: str) -> None:
    """Move the finished local file ``local`` to ``path``: it appears whole."""
    fs, inner = resolve(path)
    if isinstance(fs, pafs.LocalFileSystem):  # a rename on one disk, else a copy first
        _replace(inner, lambda tmp: shutil.move(str(local), tmp))
        return
    with open(local, "rb") as src, fs.open_output_stream(inner) as dst:
        while chunk := src.read(_COPY_CHUNK):
            dst.write(chunk)
    Path(local).unlink()


def delete(path: str) -> None:
    fs, inner = resolve(path)
    if fs.get_file_info(inner).type == pafs.FileType.File:
        fs.delete_file(inner)


def delete_dir(path: str) -> None:
    """Delete a folder (a prefix) and everything in it; nothing when it does not exist."""
    fs, inner = resolve(path)
    if fs.get_file_info(inner).type == pafs.FileType.Directory:
        fs.delete_dir(inner)


def make_dir(path: str) -> None:
    fs, inner = resolve(path)
    fs.create_dir(inner, recursive=True)  # a no-op in a bucket: prefixes need no creation


def upload_dir(local: str | Path, path: str) -> None:
    """Copy the local folder ``local`` to ``path``, file by file."""
    fs, inner = resolve(path)
    fs.create_dir(inner, recursive=True)  # a local folder must exist first (a bucket: no-op)
    pafs.copy_files(str(Path(local).resolve()), inner, destination_filesystem=fs)


def download_dir(path: str, local: str | Path) -> None:
    fs, inner = resolve(path)
    Path(local).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(inner, str(Path(local).resolve()), source_filesystem=fs)


def cache_root() -> str:
    """The folder of mmray's caches on this machine (``~`` unexpanded): ``$MMRAY_CACHE``, else
    ``~/.cache/mmray``. It holds ``downloads/`` (copies of remote models and indexes) and
    ``text-features/`` (``data.text_cache_dir``'s default); deleting it while no job runs is
    safe."""
    return os.environ.get("MMRAY_CACHE") or "~/.cache/mmray"


def downloads_dir() -> Path:
    """Where copies of remote models and indexes are kept."""
    return Path(cache_root()).expanduser() / "downloads"


def cached(key: str, fetch: Callable[[Path], str | Path]) -> Path:
    """The local copy of what ``key`` names (something that never changes under that key: a
    model version, a run's artifact, an object at one mtime), fetched once per machine.
    ``fetch(tmp)`` writes it under the empty folder ``tmp`` and returns the folder holding it;
    that folder is renamed into the cache whole, so a reader never sees a partial copy, and
    of two processes fetching at once the first rename wins (the copies are the same)."""
    folder = downloads_dir() / hashlib.sha256(key.encode()).hexdigest()[:32]
    if folder.is_dir():
        with contextlib.suppress(OSError):  # a read-only cache is never pruned either
            os.utime(folder)  # its last use: what the pruning below goes by
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    _prune(folder.parent)
    tmp = tempfile.mkdtemp(prefix=".partial-", dir=folder.parent)
    try:
        os.rename(fetch(Path(tmp)), folder)
    except OSError:
        if not folder.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


CACHE_DAYS = 30  # a download no process has asked for in this long is removed


def _prune(downloads: Path) -> None:
    """Remove the copies unused for ``CACHE_DAYS`` and the leftovers of fetches killed a day
    ago or more, so the cache does not grow with every model version ever served. A process
    that still holds a pruned copy's files keeps reading them (POSIX); asking again fetches
    it anew."""
    now = time.time()
    for entry in downloads.iterdir():
        try:
            age = now - entry.stat().st_mtime
        except FileNotFoundError:  # pruned by another process just now
            continue
        limit = 86_400 if entry.name.startswith(".partial-") else CACHE_DAYS * 86_400
        if age > limit:
            shutil.rmtree(entry, ignore_errors=True)


def check_readable(key: str, path: str) -> None:
    """ConfigError unless ``path`` exists and can be read: a missing file, bucket or prefix,
    or credentials the store refuses, named before any work starts."""
    try:
        fs, inner = resolve(path)
        found = fs.get_file_info(inner).type
        if found == pafs.FileType.Directory and is_uri(path):  # a prefix: may we list it?
            fs.get_file_info(pafs.FileSelector(inner, allow_not_found=False))
        bucket = inner.split("/", 1)[0]
        if found == pafs.FileType.NotFound and is_uri(path) and "/" in inner:
            if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise ConfigError(f"{key}: {path}: the bucket {bucket!r} does not exist")
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {_reason(e)}") from e
    if found == pafs.FileType.NotFound:
        raise ConfigError(f"{key}: {absolute(path)} does not exist")


def check_writable(key: str, path: str) -> None:
    """ConfigError unless mmray can write under ``path``: for a bucket, it exists and these
    credentials may write to it (checked with a small object, deleted again)."""
    if not is_uri(path):
        return
    probe = join(path, f".mmray-write-check-{os.getpid()}")
    try:
        write_bytes(probe, b"")
        delete(probe)
    except OSError as e:
        raise ConfigError(f"{key}: cannot write to {path}: {_reason(e)}") from e


_KEY_ERRORS = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "403")


def _reason(error: OSError) -> str:
    """The store's own words without request ids, and what to check when it refused the
    credentials (which are never printed)."""
    text = str(error).split(" (Request ID", 1)[0].strip()
    text = text.split("AWS Error ", 1)[-1]
    if any(code in text for code in _KEY_ERRORS):
        text += (
            " (check the credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and "
            "AWS_ENDPOINT_URL for an S3-compatible store)"
        )
    return text
