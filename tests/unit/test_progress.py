"""Progress lines (a log) and bars (a terminal), and the demo following them in a job's log."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

from pipelines import progress
from pipelines.progress import Follow, Progress, parse
from pipelines.train import progress_fields


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_plain_lines_that_parse_back() -> None:
    out = io.StringIO()
    with Progress("curate", total=400, unit="rows", every_s=0, file=out) as progress:
        progress.update(100, kept=90)
        progress.update(300, kept=250)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # one per update, the last not repeated at close
    first = parse(lines[0])
    assert first == {"stage": "curate", "n": 100, "total": 400, "unit": "rows",
                     "rest": first["rest"], "line": lines[0]}  # fmt: skip
    assert lines[0].endswith("(25%) | ETA ? | kept 90")  # no rate yet: one update so far
    assert lines[1].startswith("progress: curate 400/400 rows (100%)")
    assert " rows/s | ETA 00:00 | kept 250" in lines[1]

    quiet = io.StringIO()  # a line every every_s (none in the first), the last at the end
    with Progress("train", total=10, unit="steps", done=2, file=quiet) as progress:
        for _ in range(8):
            progress.update(1, loss=1.23456)
    lines = quiet.getvalue().splitlines()
    assert [parse(x)["n"] for x in lines] == [10] and "loss 1.23" in lines[-1]


def test_slow_units_count_from_the_start_in_seconds_each(monkeypatch) -> None:
    now = [0.0]
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: now[0]))
    out = io.StringIO()
    with Progress("tune", total=4, unit="trials", every_s=0, file=out, from_start=True) as p:
        now[0] = 100.0
        p.update(1)  # the first trial ended 100 s after the start: that is its rate
        now[0] = 200.0
        p.update(1)
    lines = out.getvalue().splitlines()
    assert "| 100 s/trial | ETA 05:00" in lines[0] and "| 100 s/trial | ETA 03:20" in lines[1]


def test_counted_from_the_start_no_eta_before_five_percent(monkeypatch) -> None:
    """A crawl's first finished task comes after the stage's start-up: its rate says little
    about the rest, so no ETA yet; the rate is shown, as it is."""
    now = [0.0]
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: now[0]))
    out = io.StringIO()
    with Progress("curate", total=8000, unit="rows", every_s=0, file=out, from_start=True) as p:
        now[0] = 16.0
        p.update(64)
        now[0] = 30.0
        p.update(5776)
    first, second = out.getvalue().splitlines()
    assert first == "progress: curate 64/8000 rows (0%) | 4 rows/s | ETA ?"
    assert second.endswith("(73%) | 195 rows/s | ETA 00:11")


def test_nothing_counted_since_the_first_update_shows_no_rate(monkeypatch) -> None:
    """All of it in one update (a replica, a small crawl's one task): no "0 replicas/s",
    and at the end ETA 00:00, not "?"."""
    now = [0.0]
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: now[0]))
    out = io.StringIO()
    with Progress("serve", total=1, unit="replicas", every_s=0, file=out) as p:
        p.emit()
        now[0] = 14.0
        p.update(1)
    assert out.getvalue().splitlines() == [
        "progress: serve 0/1 replicas (0%) | ETA ?",
        "progress: serve 1/1 replicas (100%) | ETA 00:00",
    ]


def test_a_terminal_gets_a_bar_redrawn_in_place() -> None:
    out = Terminal()
    with Progress("serve", total=2, unit="replicas", file=out) as progress:
        progress.update(1)
        progress.update(1)
    text = out.getvalue()
    assert "\r" in text and "2/2" in text and "progress:" not in text


def test_follow_shows_the_stages_lines_from_a_growing_log() -> None:
    out = io.StringIO()
    follow = Follow(("tune", "train"), file=out, every_s=3600)
    log = "(RayTrainWorker pid=1) progress: train 10/100 steps (10%) | 2 steps/s | ETA 00:45\n"
    follow.update(log + "noise\nprogress: curate 1/2 rows (50%)\nprogress: tune 0/4 tr")
    log += "noise\nprogress: curate 1/2 rows (50%)\nprogress: tune 0/4 trials (0%) | running 1\n"
    follow.update(log)
    log += "progress: train 20/100 steps (20%)\nprogress: train 30/100 steps (30%)\n"
    follow.update(log)
    follow.close()
    assert out.getvalue().splitlines() == [
        "    progress: train 10/100 steps (10%) | 2 steps/s | ETA 00:45",
        "    progress: tune 0/4 trials (0%) | running 1",  # once whole
        "    progress: train 30/100 steps (30%)",  # throttled; the latest at close
    ]
    bars = Terminal()
    follow = Follow(("train",), file=bars)
    follow.update("progress: train 50/100 steps (50%) | loss 2\n")
    follow.update("progress: train 50/100 steps (50%) | loss 2\nprogress: train 5/100 steps (5%)\n")
    follow.close()
    assert "50/100" in bars.getvalue() and "5/100" in bars.getvalue()  # a new run, a new bar


def test_train_progress_shows_loss_and_the_last_evaluation() -> None:
    metrics = {"train/loss": 2.5, "train/samples_per_s": 230.0, "train/lr": 1e-3,
               "eval/zeroshot/shape/top1": 0.7, "eval/zeroshot/shape/top5": 1.0,
               "eval/retrieval/i2t_r5": 0.8, "eval/retrieval/t2i_r1": 0.5}  # fmt: skip
    assert progress_fields(metrics) == {"loss": 2.5, "shape": 0.7, "i2t_r5": 0.8}


def test_samples_per_second_follow_the_steps_rate_not_the_last_step(monkeypatch) -> None:
    """Training shows samples/s at the rate of the steps so far: the last step's own rate
    swung between 37 and 270 from one line to the next (a line is likelier to follow a slow
    step, one that waited for data), beside a steady 2 steps/s."""
    now = [0.0]
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: now[0]))
    out, bar = io.StringIO(), Terminal()
    for file in (out, bar):
        now[0] = 0.0
        with Progress("train", 100, "steps", every_s=0, file=file, per_unit=("samples", 64)) as p:
            p.update(1, loss=2.0)  # the first step: the rate counts from here
            for step in range(2, 11):  # 0.2 s a step; steps 5 and 10 wait 1.7 s
                now[0] += 1.7 if step % 5 == 0 else 0.2
                p.update(1, loss=1.0)
    # 9 steps of 64 in 4.8 s; the last step alone ran at 64 / 1.7 = 37.6 samples/s
    last = out.getvalue().splitlines()[-1]
    assert last.endswith("| 1.87 steps/s | ETA 00:48 | samples/s 120 | loss 1")
    assert "samples/s 120" in bar.getvalue()  # the bar's postfix too


def test_a_sweep_counts_samples_and_a_trial_stopped_early_counts_whole(monkeypatch, capsys) -> None:
    from mmcore.config import load_config
    from pipelines import tune

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    sweep = load_config(tune.SweepConfig, "pipelines/configs/tune/demo.yaml",
                        ["trial.data.path=x", "samples_per_trial=100"])  # fmt: skip
    callback = tune._progress(sweep)  # 2 trials of 100 samples
    callback.setup()
    metric = {sweep.metric: 0.5}
    first, second = (SimpleNamespace(trial_id=x, status="RUNNING", last_result={}) for x in "ab")
    callback.on_trial_start(0, [], first)
    callback.on_trial_result(0, [], first, {"train/samples_seen": 50} | metric)
    assert callback.progress.n == 50
    first.last_result = {"train/samples_seen": 50}  # stopped there (ASHA)
    callback.on_trial_complete(0, [], first)
    assert callback.progress.n == 100  # the half it skipped is not left to do either
    callback.on_trial_start(0, [], second)
    callback.on_trial_result(0, [], second, {"train/samples_seen": 30})
    callback.on_trial_result(0, [], second, {"train/samples_seen": 10})  # restored: not negative
    callback.on_trial_result(0, [], second, {"train/samples_seen": 100, sweep.metric: 0.7})
    second.last_result = {"train/samples_seen": 100}
    callback.on_trial_complete(0, [], second)
    second.status = first.status = "TERMINATED"
    callback.on_step_begin(0, [first, second])  # both counted already
    callback.on_experiment_end([])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("progress: tune 200/200 samples (100%)")
    assert line.endswith(f"trials 2/2 | running 0 | stopped early 1 | best {sweep.metric} 0.700")

    # The same sweep restored after a kill: the first trial had ended, the second starts again.
    restored = tune._progress(sweep)
    restored.setup()
    second.status, second.last_result = "PENDING", {}
    restored.on_step_begin(0, [first, second])
    restored.on_step_begin(1, [first, second])  # counted once
    restored.on_trial_start(1, [], second)
    assert restored.progress.n == 100 and restored.stopped == 1 and restored.ended == 1


def test_the_closing_line_carries_fields_that_changed_after_the_last_count() -> None:
    # A sweep's last trial reports its last samples, then ends: the count is whole already,
    # but the last line must say so ("trials 2/2", not "trials 1/2 | running 1").
    out = io.StringIO()
    with Progress("tune", total=2, unit="samples", every_s=0, file=out) as progress:
        progress.update(2, trials="1/2")
        progress.every_s = 60  # the end comes sooner than the next line
        progress.update(0, trials="2/2")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[-1].endswith("| trials 2/2")
