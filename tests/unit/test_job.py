"""The job shell (pipelines/job.py) and the stall guard of the training loop, without Ray."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import pytest

from mmcore import tracking
from mmcore.config import ConfigError
from mmcore.tracking import TrackingConfig
from mmcore.training import DataStalled, within
from pipelines import job

RAY_JOB = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # what Ray sets in the driver of a submitted job


def test_a_job_that_cannot_fit_is_refused_with_what_to_change() -> None:
    train = job.Need(cpus=2, data_cpus=2)  # 2 workers of 1 CPU, and Ray Data beside them
    job.fits(train, {"CPU": 3.0})  # one CPU left for data tasks is enough to make progress
    with pytest.raises(ConfigError) as e:
        job.fits(train, {"CPU": 2.0})  # the new user's hang: workers took both CPUs
    assert "has 2 CPU" in str(e.value) and "1 more CPU for Ray Data" in str(e.value)
    assert "scaling.num_workers" in str(e.value) and "--num-cpus" in str(e.value)
    with pytest.raises(ConfigError, match="0 GPU"):
        job.fits(job.Need(cpus=2, gpus=2), {"CPU": 16.0})


def test_under_ray_job_submit_relative_outputs_and_the_embedded_store_are_refused(
    monkeypatch, tmp_path
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job.check_output("output", "runs")  # a plain run: the user's own working directory
    job.check_tracking(TrackingConfig())
    monkeypatch.setenv(RAY_JOB, json.dumps({"runtime_env": {"working_dir": "gcs://pkg.zip"}}))
    with pytest.raises(ConfigError, match="temporary copy of --working-dir"):
        job.check_output("output", "runs")
    job.check_output("output", str(tmp_path))  # absolute: fine
    job.check_output("output", "s3://bucket/runs")
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI"):
        job.check_tracking(TrackingConfig())
    job.check_tracking(TrackingConfig(enabled=False))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    job.check_tracking(TrackingConfig())
    monkeypatch.chdir(tmp_path)  # the job's copy of the working directory, without data/
    with pytest.raises(ConfigError, match="leaves out what .gitignore lists"):
        job.check_input("data.path", "data/shards")  # ignored folders are not uploaded


def test_shards_may_be_a_folder_or_one_tar_and_outputs_are_folders(tmp_path) -> None:
    """`mmray train --data x.tar` and `--output FILE` were tracebacks until 2026-12-08."""
    (tmp_path / "00001.tar").touch()
    (tmp_path / "00000.tar").touch()
    (tmp_path / "meta.parquet").touch()
    tars = [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]
    assert job.shard_paths(str(tmp_path)) == tars
    assert job.shard_paths(tars[1]) == tars[1:]
    with pytest.raises(ConfigError, match="no .tar shards in .*meta.parquet"):
        job.shard_paths(str(tmp_path / "meta.parquet"))
    with pytest.raises(ConfigError, match="meta.parquet is a file; give a folder"):
        job.check_output("--output", str(tmp_path / "meta.parquet"))
    job.check_output("--output", str(tmp_path / "new"))  # made when written


def test_job_main_prints_only_the_json_line_on_stdout(capsys) -> None:
    def work(cfg: dict) -> dict:
        print("a stray print from a library")
        return {"ok": cfg["n"]}

    assert job.main("mmray x", lambda: {"n": 1}, work) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == ['{"ok": 1}'] and "stray print" in err

    def bad(cfg: dict) -> None:
        raise ValueError("shards missing")

    assert job.main("mmray x", lambda: {"n": 1}, work, bad) == 2
    out, err = capsys.readouterr()
    assert out == "" and "mmray x: error: shards missing" in err

    def interrupted(cfg: dict) -> dict:
        raise KeyboardInterrupt  # Ctrl-C while the job runs: a line and 130, no traceback

    assert job.main("mmray x", lambda: {"n": 1}, interrupted) == 130
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == "mmray x: interrupted"


def test_the_tracking_store_opens_while_the_job_starts(monkeypatch, tmp_path) -> None:
    """job.main opens the MLflow store on a thread before the work; the work's run lands in
    it. A store that cannot be opened fails in start_run, with MLflow's error."""
    import mlflow

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setattr(tracking, "_warm_up", None)

    @dataclasses.dataclass
    class Config:
        tracking: TrackingConfig = dataclasses.field(
            default_factory=lambda: TrackingConfig(experiment="warm")
        )

    def work(cfg: Config) -> dict:
        assert tracking._warm_up is not None  # started before the work
        with tracking.start_run(cfg.tracking, run_name="r") as tracker:
            return {"run_id": tracker.run_id}

    assert job.main("mmray x", Config, work) == 0
    runs = mlflow.MlflowClient(store).search_runs(
        [mlflow.MlflowClient(store).get_experiment_by_name("warm").experiment_id]
    )
    assert [r.info.run_name for r in runs] == ["r"]

    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'a-file' / 'm.db'}")
    monkeypatch.setattr(tracking, "_warm_up", None)
    tracking.warm_up(TrackingConfig())
    with pytest.raises(Exception, match="a-file"):
        with tracking.start_run(TrackingConfig()):
            pass


def test_within_passes_items_through_and_stops_a_stalled_loader() -> None:
    assert list(within(iter(range(5)), 5.0, str)) == [0, 1, 2, 3, 4]
    assert list(within(iter(range(3)), 0, str)) == [0, 1, 2]  # 0: no guard

    release = threading.Event()

    def stalls():
        yield "first"
        release.wait(30)  # a loader whose tasks can never be scheduled
        yield "late"

    items = within(stalls(), 0.5, lambda t: f"nothing for {t} s")
    assert next(items) == "first"
    t0 = time.monotonic()
    with pytest.raises(DataStalled, match="nothing for 0.5 s"):
        next(items)
    assert time.monotonic() - t0 < 5
    release.set()

    def fails():
        yield 1
        raise OSError("shard unreadable")

    with pytest.raises(OSError, match="shard unreadable"):
        list(within(fails(), 5.0, str))


def test_jobs_ask_for_their_workers_and_room_for_ray_data(monkeypatch) -> None:
    from mmcore.config import load_config
    from pipelines import train, tune

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    cfg = load_config(train.TrainConfig, "pipelines/configs/train/tiny.yaml", ["data.path=x"])
    assert train.need(cfg) == job.Need(cpus=2, data_cpus=2)  # 2 workers of 1 CPU
    sweep = load_config(tune.SweepConfig, "pipelines/configs/tune/tiny.yaml",
                        ["max_concurrent_trials=2", "trial.data.path=x"])  # fmt: skip
    need = tune.need(sweep)  # each trial: its own process, 2 workers, its data tasks
    assert need.cpus == pytest.approx(2 * (tune.DRIVER_CPUS + 2)) and need.data_cpus == 4


def test_tune_report_names_what_is_wrong(monkeypatch, tmp_path, capsys) -> None:
    """An unknown run id, or a run that is no finished sweep: exit 2 and one line (MLflow's
    traceback before)."""
    import mlflow

    from pipelines import tune

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    client = mlflow.MlflowClient(store)
    run = client.create_run(client.create_experiment("x")).info.run_id
    assert tune.main(["report", "0123456789abcdef"]) == 2
    assert "sweep: MLflow run 0123456789abcdef is not in the store" in capsys.readouterr().err
    assert tune.main(["report", run]) == 2
    assert f"run {run} has no ablation.md: not a sweep" in capsys.readouterr().err
    client.log_text(run, "| trial |", "ablation.md")
    assert tune.main(["report", run]) == 0 and capsys.readouterr().out == "| trial |"
