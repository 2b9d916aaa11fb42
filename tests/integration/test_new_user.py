"""A new user's conditions, not ours: no Ray running (each job starts its own), a Ray with only
2 CPUs, no MLflow variables, a model URI the store does not know. A job either finishes with
one JSON line on stdout or fails at once with a message that says what to change."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from mmcore.config import load_config
from pipelines import serve, train

pytestmark = pytest.mark.integration
MMRAY = str(Path(sys.executable).with_name("mmray"))
ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "pipelines/configs/train/tiny.yaml")
SHORT = ["schedule.max_steps=2", "schedule.global_batch=16", "schedule.checkpoint_every=2",
         "eval.every=0", "tracking.enabled=false"]  # fmt: skip


def bare(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``mmray ARGS`` as a user runs it: no RAY_ADDRESS, no MLflow variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    return subprocess.run([MMRAY, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def one_json_line(run: subprocess.CompletedProcess) -> dict:
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert len(lines) == 1, run.stdout[-2000:]  # `... | tail -1 | jq` and `| jq` both work
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def shards(sample_dir, tmp_path_factory) -> Path:
    """Curated by `mmray curate` with its own Ray (none runs in this process yet)."""
    assert not ray.is_initialized()
    work = tmp_path_factory.mktemp("curate")
    run = bare(work, "curate", "--config", str(ROOT / "pipelines/configs/curate_tiny.yaml"),
               "--input", str(sample_dir / "metadata.parquet"), "--output", "shards",
               "tracking.enabled=false")  # fmt: skip
    summary = one_json_line(run)
    assert summary["n_input"] == 300 and "success" in run.stderr  # the table went to stderr
    return work / "shards"


@pytest.fixture(scope="module")
def two_cpus(shards):
    ray.init(num_cpus=2, object_store_memory=256 << 20, include_dashboard=False,
             log_to_driver=False)  # fmt: skip
    yield
    ray.shutdown()


def test_train_starts_a_ray_sized_for_itself_and_finishes(shards, tmp_path) -> None:
    run = bare(tmp_path, "train", "--config", TINY, "--data", str(shards), *SHORT, "output=out")
    result = one_json_line(run)
    cpus = max(os.cpu_count() or 1, 4)  # 2 workers + 2 CPUs for Ray Data's tasks
    assert f"starting a local Ray for this job: {cpus} logical CPUs" in run.stderr
    assert result["metrics"]["step"] == 2
    assert Path(result["export"]).is_relative_to(tmp_path / "out")


def test_an_unknown_model_fails_before_ray_or_serve_start(mlflow_server, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)  # another, empty store
    for uri in ("models:/m-0123456789abcdef", "models:/mmray-tiny@champion",
                "runs:/0123456789abcdef/model"):  # fmt: skip
        t0 = time.monotonic()
        assert serve.main(["--model", uri]) == 2
        err = capsys.readouterr().err
        assert f"model {uri} was not found in the MLflow store {mlflow_server.url}" in err
        assert time.monotonic() - t0 < 30 and not ray.is_initialized()
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert serve.main(["--model", "models:/mmray-tiny@champion"]) == 2
    assert "there is no MLflow store at sqlite:///" in capsys.readouterr().err
    assert serve.main(["--model", "no/such/folder"]) == 2
    assert "no/such/folder holds no config.json" in capsys.readouterr().err


def test_on_a_cluster_too_small_the_job_fails_before_work(shards, two_cpus, tmp_path, capsys):
    args = ["--config", TINY, "--data", str(shards), *SHORT, f"output={tmp_path}"]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "the Ray cluster has 2 CPU and 0 GPU; this job needs 2 CPU + at least 1 more" in err
    assert not any(tmp_path.iterdir())  # nothing was started


def test_a_training_loop_without_data_stops_with_a_diagnosis(shards, two_cpus, tmp_path):
    # Past the driver's check (run() directly): the workers take both CPUs, so Ray Data's
    # tasks can never run; the loop must not wait forever.
    overrides = [f"data.path={shards}", *SHORT, f"output={tmp_path}",
                 "data.stall_timeout_s=10", "schedule.max_failures=0"]  # fmt: skip
    cfg = load_config(train.TrainConfig, TINY, overrides)
    t0 = time.monotonic()
    with pytest.raises(Exception) as e:
        train.run(cfg)
    assert "received no batch from Ray Data in 10 s" in str(e.value)
    assert "the cluster has 2 CPU" in str(e.value)
    assert time.monotonic() - t0 < 240
