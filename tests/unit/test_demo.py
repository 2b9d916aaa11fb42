"""The demo's reading of job logs and its report (the stages themselves run in tests/e2e)."""

from __future__ import annotations

import socket

import pytest

from pipelines.demo import ANSI, last_json, parse_args
from pipelines.local import free_port
from pipelines.report import Report, data_url, render


def test_last_json_finds_the_result_line_among_progress_output() -> None:
    logs = (
        '{"early": 1}\n'
        "\x1b[A\x1b[A- split: 100%|####| 134/134 [00:13<00:00]"  # a progress bar, same line
        '{"run_id": "abc", "metrics": {"eval/x": 0.5}}\n'
        "(pid=7) {not json, a log line\n"
    )
    assert last_json(ANSI.sub("", logs)) == {"run_id": "abc", "metrics": {"eval/x": 0.5}}
    assert last_json("no result here\n") == {}


def test_a_port_in_use_stops_the_demo_before_it_starts(capsys) -> None:
    """Until 2026-12-08 a taken --serve-port failed the demo's last stage, after the whole run."""
    names = ["mlflow", "dashboard", "gcs", "serve"]
    flags = [f"--{name}-port={free_port()}" for name in names]
    assert parse_args(flags).serve_port == int(flags[-1].split("=")[1])
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(SystemExit) as exit_:
            parse_args([*flags[:3], f"--serve-port={port}"])
        assert exit_.value.code == 2
        assert f"port {port} (--serve-port) is in use" in capsys.readouterr().err
        assert parse_args(["--stop", f"--serve-port={port}"]).stop  # stopping checks nothing
        # A server just stopped leaves its closed connections in TIME_WAIT for a minute: the
        # port is free all the same (servers bind with SO_REUSEADDR), as after a demo --stop.
        client = socket.create_connection(("127.0.0.1", port))
        served, _ = other.accept()
        served.close()  # the server's side closes first: its port holds the TIME_WAIT
        client.close()
    assert parse_args([*flags[:3], f"--serve-port={port}"]).serve_port == port


def test_the_report_holds_every_section_inline() -> None:
    dot = data_url(b"\x89PNG fake")
    report = Report(
        table=[("champion", "models:/mmray-tiny/1 <late>")],
        status_counts={"success": 90, "duplicate": 3},
        curves={"train/loss": [(1, 4.0), (2, 3.0)], "eval/zeroshot/shape/top1": [(2, 0.7)]},
        ablation=[b"\x89PNG one"], classify=[{"image": dot, "truth": "circle", "answer": "circle"},
                                             {"image": dot, "truth": "cross", "answer": "square"}],
        search_query="a circle",
        search_hits=[{"thumbnail": dot, "caption": "a red circle", "score": 0.5}],
    )  # fmt: skip
    page = render(report)
    for section in ("summary", "curation", "training", "ablation", "classify", "search"):
        assert f'<section id="{section}">' in page
    assert "&lt;late&gt;" in page  # escaped
    assert page.count("data:image/png;base64,") == 2 + 1 + 3  # charts, ablation, answers
    assert '<b class="right">circle</b>' in page and '<b class="wrong">square</b>' in page
    assert "http" not in page  # nothing to fetch: it opens from disk or as an artifact
