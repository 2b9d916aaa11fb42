"""Download image bytes from http(s)://, file:// or plain paths, with bounded time and size.

Every attempt has a hard deadline (``timeout_s`` for the whole body, not only per socket read),
so a server that hangs or drips bytes cannot hang the job. Transient failures (connection
errors, timeouts, HTTP 408/429/5xx) are retried with exponential backoff; others are not.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote, urlparse

import requests
import urllib3

from mmcore.data.images import Rejected

_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
_CHUNK = 1 << 16


@dataclasses.dataclass(kw_only=True)
class FetchConfig:
    """How images are downloaded."""

    timeout_s: float = 10.0  # per attempt: connect, each read, and the whole body
    retries: int = 0  # extra attempts after a transient failure (img2dataset's default)
    backoff_s: float = 0.5  # sleep before retry k is backoff_s * 2**k
    max_bytes: int = 32 << 20  # larger bodies: file_too_large
    threads: int = 16  # concurrent downloads within one task
    user_agent: str = "mmray/0.1 (image-text dataset curation; +https://github.com/mmray)"

    def validate(self) -> None:
        if self.timeout_s <= 0 or self.retries < 0 or self.threads < 1 or self.max_bytes < 1:
            raise ValueError("need timeout_s > 0, retries >= 0, threads >= 1, max_bytes >= 1")


class _Transient(Exception):
    """A failure worth another attempt."""


def fetch_many(urls: Sequence[str], cfg: FetchConfig) -> list[bytes | Rejected]:
    """Fetch ``urls`` concurrently; each result is the body or the ``Rejected`` reason."""
    with requests.Session() as session:
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=cfg.threads, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.headers["User-Agent"] = cfg.user_agent

        def one(url: str) -> bytes | Rejected:
            try:
                return fetch(url, cfg, session)
            except Rejected as e:
                return e

        with ThreadPoolExecutor(max_workers=min(cfg.threads, max(1, len(urls)))) as pool:
            return list(pool.map(one, urls))


def fetch(url: str, cfg: FetchConfig, session: requests.Session | None = None) -> bytes:
    """Return the body at ``url``; raises ``Rejected`` with the reason."""
    if not url:
        raise Rejected("failed_to_download", "empty url")
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        return _fetch_http(url, cfg, session or requests.Session())
    if parsed.scheme == "file":
        return _read_file(Path(unquote(parsed.path)), cfg.max_bytes)
    if parsed.scheme and len(parsed.scheme) > 1:  # "c:" would be a Windows drive
        raise Rejected("failed_to_download", f"unsupported URL scheme {parsed.scheme!r}")
    return _read_file(Path(url), cfg.max_bytes)


def _read_file(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise Rejected("file_too_large", f"{size} bytes > {max_bytes}")
        return path.read_bytes()
    except OSError as e:
        raise Rejected("failed_to_download", f"{type(e).__name__}: {e}") from e


def _fetch_http(url: str, cfg: FetchConfig, session: requests.Session) -> bytes:
    for attempt in range(cfg.retries + 1):
        try:
            return _get_once(url, cfg, session)
        except _Transient as e:
            if attempt == cfg.retries:
                tries = f" after {attempt + 1} attempts" if attempt else ""
                raise Rejected("failed_to_download", f"{e}{tries}") from None
            time.sleep(cfg.backoff_s * 2**attempt)
    raise AssertionError("unreachable")


def _get_once(url: str, cfg: FetchConfig, session: requests.Session) -> bytes:
    deadline = time.monotonic() + cfg.timeout_s
    try:
        with session.get(url, stream=True, timeout=cfg.timeout_s) as resp:
            if resp.status_code in _RETRY_STATUS:
                raise _Transient(f"HTTP {resp.status_code}")
            if resp.status_code >= 400:
                raise Rejected("failed_to_download", f"HTTP {resp.status_code}")
            declared = int(resp.headers.get("Content-Length") or 0)
            if declared > cfg.max_bytes:
                raise Rejected("file_too_large", f"{declared} bytes > {cfg.max_bytes}")
            body = bytearray()
            while chunk := resp.raw.read1(_CHUNK, decode_content=True):
                body += chunk
                if len(body) > cfg.max_bytes:
                    raise Rejected("file_too_large", f"more than {cfg.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise _Transient(f"timeout: body not complete after {cfg.timeout_s}s")
            return bytes(body)
    except (Rejected, _Transient):
        raise
    except (requests.Timeout, requests.ConnectionError) as e:
        raise _Transient(f"{type(e).__name__}: {e}") from e
    except requests.RequestException as e:  # invalid URL, too many redirects, ...
        raise Rejected("failed_to_download", f"{type(e).__name__}: {e}") from e
    except (urllib3.exceptions.HTTPError, OSError) as e:  # from raw reads of the body
        raise _Transient(f"{type(e).__name__}: {e}") from e
