"""Fetching over real HTTP on 127.0.0.1, and from files."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mmcore.data.fetch import FetchConfig, fetch, fetch_many
from mmcore.data.images import Rejected
from pipelines.local import ImageServer


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("www")
    (root / "a.jpg").write_bytes(b"A" * 1000)
    (root / "big.jpg").write_bytes(b"B" * 5000)
    with ImageServer(root) as s:
        yield s


def reason(url: str, cfg: FetchConfig) -> tuple[str, str]:
    with pytest.raises(Rejected) as e:
        fetch(url, cfg)
    return e.value.status, e.value.message


def test_http_ok_and_errors(server: ImageServer) -> None:
    cfg = FetchConfig(timeout_s=2, retries=2, backoff_s=0.01)
    assert fetch(f"{server.url}/images/a.jpg", cfg) == b"A" * 1000
    assert reason(f"{server.url}/images/none.jpg", cfg) == ("failed_to_download", "HTTP 404")
    assert server.hits["/images/none.jpg"] == 1  # a 404 is not retried
    status, message = reason(f"{server.url}/status/500", cfg)
    assert (status, message) == ("failed_to_download", "HTTP 500 after 3 attempts")
    assert server.hits["/status/500"] == 3


def test_redirects_are_followed_up_to_a_limit(server: ImageServer) -> None:
    assert fetch(f"{server.url}/redirect/a.jpg", FetchConfig()) == b"A" * 1000
    assert reason(f"{server.url}/loop", FetchConfig())[1].startswith("too many redirects")


def test_connection_refused_is_retried_then_reported() -> None:
    from pipelines.local import free_port

    status, message = reason(
        f"http://127.0.0.1:{free_port()}/x.jpg", FetchConfig(retries=1, backoff_s=0.01)
    )
    assert status == "failed_to_download" and message.endswith("after 2 attempts")


def test_a_dropped_connection_is_retried_then_reported(server: ImageServer) -> None:
    status, message = reason(f"{server.url}/drop", FetchConfig(retries=1, backoff_s=0.01))
    assert status == "failed_to_download" and "closed" in message.lower(), message
    assert message.endswith("after 2 attempts") and server.hits["/drop"] == 2


def test_retry_recovers_from_a_transient_error(server: ImageServer) -> None:
    cfg = FetchConfig(retries=1, backoff_s=0.01)
    assert fetch(f"{server.url}/flaky/a.jpg", cfg) == b"A" * 1000
    assert server.hits["/flaky/a.jpg"] == 2


def test_size_limit(server: ImageServer, tmp_path: Path) -> None:
    cfg = FetchConfig(max_bytes=2000)
    assert reason(f"{server.url}/images/big.jpg", cfg)[0] == "file_too_large"
    (tmp_path / "big").write_bytes(b"x" * 3000)
    assert reason(str(tmp_path / "big"), cfg)[0] == "file_too_large"


@pytest.mark.parametrize("route", ["/slow/30", "/drip"])
def test_a_hanging_server_cannot_hang_the_fetch(server: ImageServer, route: str) -> None:
    t0 = time.monotonic()
    status, message = reason(f"{server.url}{route}", FetchConfig(timeout_s=0.5))
    assert status == "failed_to_download" and (
        "timeout" in message.lower() or "timed out" in message
    )
    assert time.monotonic() - t0 < 5  # bounded by the deadline, not by the server


def test_files_and_bad_urls(tmp_path: Path) -> None:
    (tmp_path / "x y.jpg").write_bytes(b"data")
    cfg = FetchConfig()
    assert fetch(str(tmp_path / "x y.jpg"), cfg) == b"data"
    assert fetch((tmp_path / "x y.jpg").as_uri(), cfg) == b"data"
    assert reason(str(tmp_path / "missing.jpg"), cfg)[0] == "failed_to_download"
    assert reason("", cfg) == ("failed_to_download", "empty url")
    assert reason("ftp://host/x.jpg", cfg)[0] == "failed_to_download"


def test_fetch_many_keeps_order_and_reasons(server: ImageServer) -> None:
    urls = [f"{server.url}/images/a.jpg", f"{server.url}/status/404", f"{server.url}/images/a.jpg"]
    out = fetch_many(urls, FetchConfig(threads=3))
    assert out[0] == out[2] == b"A" * 1000
    assert isinstance(out[1], Rejected) and out[1].message == "HTTP 404"


def test_an_x_robots_tag_opt_out_is_not_kept(server: ImageServer) -> None:
    cfg = FetchConfig(timeout_s=2)
    url = f"{server.url}/robots/{{}}/a.jpg".format
    assert reason(url("noai"), cfg) == ("opted_out", "X-Robots-Tag: noai")
    assert reason(url("nofollow%2C%20NoImageIndex"), cfg) == (
        "opted_out",
        "X-Robots-Tag: noimageindex",
    )
    assert reason(url("mmray%3A%20noindex"), cfg) == ("opted_out", "X-Robots-Tag: noindex")
    assert fetch(url("otherbot%3A%20noai"), cfg) == b"A" * 1000  # speaks to another agent
    assert fetch(url("nofollow"), cfg) == b"A" * 1000
    assert fetch(url("noai"), FetchConfig(timeout_s=2, disallowed_directives=[])) == b"A" * 1000
    with pytest.raises(ValueError, match="lower-case"):
        FetchConfig(disallowed_directives=["NoAI"]).validate()


def test_retry_after_is_honoured_up_to_a_bound(server: ImageServer) -> None:
    t0 = time.monotonic()
    cfg = FetchConfig(timeout_s=2, retries=1, backoff_s=0.01)
    assert fetch(f"{server.url}/busy/1/a.jpg", cfg) == b"A" * 1000
    assert time.monotonic() - t0 >= 1.0  # waited as asked, not the 0.01 s backoff
    t0 = time.monotonic()
    capped = FetchConfig(timeout_s=2, retries=1, backoff_s=0.01, max_retry_after_s=0.1)
    assert fetch(f"{server.url}/busy/30/a.jpg", capped) == b"A" * 1000
    assert time.monotonic() - t0 < 10  # not the 30 s the server asked for
    once = FetchConfig(timeout_s=2)  # no retries: the 429 is the reason
    assert reason(f"{server.url}/busy/1/big.jpg", once) == ("failed_to_download", "HTTP 429")


def test_per_host_concurrency_bounds_requests_in_flight(server: ImageServer) -> None:
    for path, limit in (("/slow/0.21", 2), ("/slow/0.2", 0)):
        urls = [server.url + path] * 12
        cfg = FetchConfig(threads=8, per_host_concurrency=limit)
        assert fetch_many(urls, cfg) == [b"late"] * 12
    assert server.max_in_flight["/slow/0.21"] == 2
    assert server.max_in_flight["/slow/0.2"] > 2  # without a bound the threads all go at once
