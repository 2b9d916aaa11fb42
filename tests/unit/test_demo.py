"""The demo's reading of job logs (the stages themselves run in tests/e2e)."""

from __future__ import annotations

from pipelines.demo import ANSI, last_json


def test_last_json_finds_the_result_line_among_progress_output() -> None:
    logs = (
        '{"early": 1}\n'
        "\x1b[A\x1b[A- split: 100%|####| 134/134 [00:13<00:00]"  # a progress bar, same line
        '{"run_id": "abc", "metrics": {"eval/x": 0.5}}\n'
        "(pid=7) {not json, a log line\n"
    )
    assert last_json(ANSI.sub("", logs)) == {"run_id": "abc", "metrics": {"eval/x": 0.5}}
    assert last_json("no result here\n") == {}
