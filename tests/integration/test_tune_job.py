"""The sweep job: Ray Tune over fusion × loss, each trial a Ray Train run, on the session's
real local Ray (its dashboard serves the State API that Ray Train's placement-group cleaner
polls: without it, a finished trial's placement group can outlive the trial and starve the
next) and a real MLflow server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from mmcore.config import load_config
from mmcore.tracking import SWEEP_TAG, load
from pipelines import tune
from pipelines.tune import SweepConfig
from tests.helpers import interrupt_when_logged

pytestmark = pytest.mark.integration


def test_a_killed_sweep_restores_logs_the_ablation_and_crowns_a_champion(
    ray_cluster, shards, sample_dir, mlflow_server, tmp_path, monkeypatch, capsys
):
    """The user's path (`python -m pipelines.tune` on the running cluster), SIGKILLed once
    Tune has recorded its first trial as finished. The same sweep again restores it: that
    trial is kept, the others run, ASHA stops the weak ones, the champion is crowned."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    # One worker, deterministic data and the sweep's seeded learning-rate draws: every trial's
    # curve, and so ASHA's decisions, are the same on every run. The batches in shard order
    # (no shuffle buffer): these curves make ASHA stop a trial; the draws of a buffer give
    # other curves, with which it stopped none. 30 % held out: 48 validation pairs, a metric
    # with room to differ.
    training = {
        "data.path": str(shards), "scaling.num_workers": 1, "schedule.global_batch": 16,
        "data.shuffle_buffer": 0,
        "schedule.log_every": 1, "eval.every": 2, "eval.max_pairs": 48,
        "data.val_fraction": 0.3, "data.deterministic": True, "optim.warmup_steps": 0,
        "eval.zeroshot": [str(sample_dir / "zeroshot" / "colour")],
    }  # fmt: skip
    args = ["name=test-sweep", f"output={tmp_path}", f"trial={json.dumps(training)}",
            "space.fusion=[late, hybrid]", "space.loss=[{clip: 1.0}, {siglip: 1.0}]",
            "samples_per_trial=96", "max_concurrent_trials=1", "registered_model=test-tune",
            "tracking.experiment=test-tune"]  # fmt: skip
    env = os.environ | {"RAY_ADDRESS": ray_cluster.address, "PYTHONPATH": str(Path.cwd())}
    cmd = [sys.executable, "-m", "pipelines.tune", "--config", "pipelines/configs/tune/tiny.yaml",
           *args]  # fmt: skip
    log = open(tmp_path / "driver.log", "w")  # noqa: SIM115 - lives with the process
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 400
    while driver.poll() is None and time.monotonic() < deadline:
        states = list((tmp_path / "test-sweep").glob("experiment_state-*.json"))
        if states and "TERMINATED" in states[0].read_text():
            break
        time.sleep(0.2)
    assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
    driver.send_signal(signal.SIGKILL)
    driver.wait()

    sweep = load_config(SweepConfig, "pipelines/configs/tune/tiny.yaml", args)
    result = tune.run(sweep)
    assert result["trials"] == 4

    client = mlflow.MlflowClient(mlflow_server.url)
    parent = client.get_run(result["run_id"])
    every = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{result['run_id']}'"
    )
    # The attempt the kill interrupted (if a trial was running then) is superseded, not left
    # RUNNING; the trial that had finished was not run again.
    superseded = [c for c in every if c.data.tags.get("mmray.superseded") == "true"]
    assert all(c.info.status == "KILLED" for c in superseded) and len(superseded) <= 1
    children = [c for c in every if c not in superseded]
    assert sorted(c.data.tags["mmray.trial"][-5:] for c in children) == [
        f"0000{i}" for i in range(4)
    ]
    (first,) = [c for c in every if c.data.tags["mmray.trial"].endswith("_00000")]
    assert first.info.status == "FINISHED" and "mmray.model_uri" in first.data.tags
    assert all(c.data.tags["mlflow.parentRunId"] == result["run_id"] for c in children)
    assert {c.data.params["model.fusion"] for c in children} == {"late", "hybrid"}
    assert all(c.info.status in ("FINISHED", "KILLED") for c in children)
    finished = [c for c in children if c.info.status == "FINISHED"]
    for child in children:  # per-trial curves: the metric at every evaluation reached
        history = client.get_metric_history(child.info.run_id, sweep.metric)
        assert history and {m.step for m in history} <= {2, 4, 6}
    artifacts = {a.path for a in client.list_artifacts(result["run_id"])}
    assert {"ablation.md", "ablation.csv", "search_space.json", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(result["run_id"], "plots")}
    assert plots == {"plots/metric_by_fusion_loss.png", "plots/learning_curves_top.png"}
    stopped = [c for c in children if c.info.status == "KILLED"]
    assert stopped and all(c.data.tags["mmray.early_stopped"] == "true" for c in stopped)
    saved = parent.data.metrics["trial_steps_saved_by_early_stopping"]
    table = mlflow.artifacts.load_text(f"runs:/{result['run_id']}/ablation.csv").splitlines()
    rows = [dict(zip(table[0].split(","), line.split(","), strict=True)) for line in table[1:]]
    early = [r for r in rows if r["status"] == "stopped early"]
    assert len(early) == len(stopped) and all(int(r["steps"]) < 6 for r in early)
    assert saved == sum(int(r["steps_saved"]) for r in rows) > 0  # budget: 96 / 16 = 6 steps
    assert (tmp_path / "test-sweep" / "config.yaml").exists()  # the resolved sweep config

    # The champion is the best trial that finished its budget, and loads by alias.
    top = max(c.data.metrics[sweep.metric] for c in finished)
    best = {c.info.run_id: c for c in finished if c.data.metrics[sweep.metric] == top}  # ties
    version = client.get_model_version_by_alias("test-tune", "champion")
    assert version.run_id in best and result["champion_moved"]
    assert float(version.tags[f"metric:{sweep.metric}"]) == pytest.approx(top)
    fusion = best[version.run_id].data.params["model.fusion"]
    assert load("models:/test-tune@champion").cfg.fusion == fusion

    # The same sweep again restores it: no trial reruns, the champion stays (not better).
    again = tune.run(sweep)
    assert again["run_id"] == result["run_id"] and again["trials"] == 4
    rerun = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{result['run_id']}'"
    )
    assert len(rerun) == len(every) and not again["champion_moved"]
    assert again["model_uri"] == result["model_uri"]  # not registered a second time
    assert client.get_model_version_by_alias("test-tune", "champion").version == version.version

    capsys.readouterr()
    assert tune.main(["report", result["run_id"]]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| trial | fusion | loss |") and table.count("\n") == 6


def test_bad_sweep_config_fails_before_any_work(tmp_path, capsys) -> None:
    assert tune.main(["--config", "pipelines/configs/tune/tiny.yaml", "--data", str(tmp_path)]) == 2
    assert "no .tar shards" in capsys.readouterr().err
    bad = ["--config", "pipelines/configs/tune/tiny.yaml", "--data", str(tmp_path),
           "space.fusion=[late]", "space.loss=[{itm: 1.0}]"]  # fmt: skip
    assert tune.main(bad) == 2
    assert "no fusion × loss cell is valid" in capsys.readouterr().err
    assert tune.main([*bad[:4], "metric=train/loss"]) == 2
    assert "evaluation metric" in capsys.readouterr().err


def test_a_sweep_whose_parent_run_another_store_holds_fails_before_any_work(
    shards, mlflow_server, tmp_path, monkeypatch, capsys
) -> None:
    # A sweep of the same name left by a run against another tracking store (another folder's
    # embedded store): restoring it would need its parent run, which this store does not have.
    folder = tmp_path / "sweeps" / "again"
    folder.mkdir(parents=True)
    (folder / "mmray_sweep.json").write_text(json.dumps({"parent_run_id": "0" * 32}))
    args = ["--config", "pipelines/configs/tune/tiny.yaml", "--data", str(shards),
            f"output={tmp_path / 'sweeps'}", "name=again"]  # fmt: skip
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    assert tune.main(args) == 2
    err = capsys.readouterr().err
    assert f"sweep 'again' ({folder}): MLflow run {'0' * 32} is not in the store" in err
    assert "restore it with the MLFLOW_TRACKING_URI it started with" in err
    store = tmp_path / "mlflow.db"  # an embedded store that is not there is not created
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    assert tune.main(args) == 2
    assert f"there is no MLflow store at sqlite:///{store}" in capsys.readouterr().err
    assert not store.exists() and os.listdir(folder) == ["mmray_sweep.json"]


def test_ctrl_c_stops_a_sweep_with_one_line_and_ends_its_runs_killed(
    ray_cluster, shards, mlflow_server, tmp_path
):
    """Until 2026-12-08 Tune's own SIGINT handler ended fit() as if the sweep were done: the
    driver then crowned from no finished trial (a RuntimeError traceback, exit 1)."""
    training = {"data.path": str(shards), "scaling.num_workers": 1,
                "schedule.global_batch": 16, "eval.every": 0}  # fmt: skip
    cmd = [sys.executable, "-m", "pipelines.tune", "--config", "pipelines/configs/tune/tiny.yaml",
           "name=ctrl-c", f"output={tmp_path}", f"trial={json.dumps(training)}",
           "space.fusion=[late]", "space.loss=[{clip: 1.0}]", "samples_per_trial=160000",
           "tracking.experiment=test-ctrl-c"]  # fmt: skip
    env = os.environ | {"RAY_ADDRESS": ray_cluster.address, "PYTHONPATH": str(Path.cwd()),
                        "MLFLOW_TRACKING_URI": mlflow_server.url}  # fmt: skip
    log_path = tmp_path / "driver.log"
    with open(log_path, "w") as log:
        driver = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        rc = interrupt_when_logged(driver, log_path, "progress: train")
    assert rc == 130, log_path.read_text()[-3000:]
    text = log_path.read_text()
    assert "sweep ctrl-c stopped: the same command again resumes it" in text
    assert "mmray tune: interrupted" in text and "Traceback" not in text
    assert not driver.stdout.read()  # no result line
    client = mlflow.MlflowClient(mlflow_server.url)
    (experiment,) = [e for e in client.search_experiments() if e.name == "test-ctrl-c"]
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"KILLED"}  # sweep and trial
