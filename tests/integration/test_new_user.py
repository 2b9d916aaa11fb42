"""A new user's conditions, not ours: no Ray running (each job starts its own), a Ray too
small for the job, no MLflow variables, a model URI the store does not know. A job either
finishes with one JSON line on stdout or fails at once with a message that says what to
change."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from mmcore.config import load_config
from pipelines import serve, train
from tests.helpers import interrupt_when_logged

pytestmark = pytest.mark.integration
MMRAY = str(Path(sys.executable).with_name("mmray"))
ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "pipelines/configs/train/tiny.yaml")
SHORT = ["schedule.max_steps=2", "schedule.global_batch=16", "schedule.checkpoint_every=2",
         "eval.every=0", "tracking.enabled=false"]  # fmt: skip


def bare(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``mmray ARGS`` as a user runs it: no RAY_ADDRESS, no MLflow variables (unless ``env``
    sets them). A Ray started by this test process is not found: only `ray start` leaves its
    address for other processes."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    return subprocess.run([MMRAY, *args], cwd=cwd, env=clean | (env or {}), capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def one_json_line(run: subprocess.CompletedProcess) -> dict:
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert len(lines) == 1, run.stdout[-2000:]  # `... | tail -1 | jq` and `| jq` both work
    return json.loads(lines[0])


def test_curate_starts_its_own_ray_and_prints_one_json_line(sample_dir, tmp_path) -> None:
    run = bare(tmp_path, "curate", "--config", str(ROOT / "pipelines/configs/curate_tiny.yaml"),
               "--input", str(sample_dir / "metadata.parquet"), "--output", "shards",
               "output.samples_per_shard=64", "tracking.enabled=false")  # fmt: skip
    summary = one_json_line(run)
    assert summary["n_input"] == 300 and "success" in run.stderr  # the table went to stderr
    done = [x for x in run.stderr.splitlines() if x.startswith("progress: curate 300/300 rows")]
    assert len(done) == 1 and "rows/s | ETA 00:00 | kept " in done[0]  # not a terminal: lines
    cpus = os.cpu_count() or 1
    assert f"starting a local Ray for this job: {cpus} logical CPUs without a dash" in run.stderr
    assert "Token authentication" not in run.stderr  # Ray's notice on each start: dropped
    assert sorted(p.name for p in (tmp_path / "shards").glob("*.tar"))[0] == "00000.tar"


def test_train_starts_a_ray_sized_for_itself_and_finishes(shards, sample_dir, tmp_path) -> None:
    # As the README has it: a zero-shot folder relative to where the user is (the workers,
    # which evaluate at the last step, run elsewhere).
    (tmp_path / "zs").symlink_to(sample_dir / "zeroshot" / "colour")
    # Past the first epoch: Ray Data's reads of later epochs are quiet too. One checkpoint, at
    # the last step (checkpoint_every=0; it divided by zero at the first step until 2026-12-08).
    steps = ["schedule.max_steps=20", "schedule.checkpoint_every=0"]
    run = bare(tmp_path, "train", "--config", TINY, "--data", str(shards), "--zeroshot", "zs",
               *SHORT, *steps, "output=out")  # fmt: skip
    result = one_json_line(run)
    cpus = max(os.cpu_count() or 1, 4)  # 2 workers + 2 CPUs for Ray Data's tasks
    assert f"starting a local Ray for this job: {cpus} logical CPUs" in run.stderr
    assert "resolved config:" in run.stderr and "stall_timeout_s: 300.0" in run.stderr
    assert result["metrics"]["step"] == 20 and result["metrics"]["eval/zeroshot/colour/top1"] >= 0
    assert result["metrics"]["train/epoch"] >= 1
    assert "progress: train 20/20 steps (100%)" in run.stderr  # rank 0's line, through Ray
    noise = {
        "all_gather_into_tensor": "torch's deprecation, from ZeRO's steps",
        "Starting execution of Dataset": "Ray Data's, every epoch",
        "execution finished in": "Ray Data's, every epoch",
        "Progress bars disabled": "Ray Data's, from each process that reads",
        "Setting accelerator to CPU": "DeepSpeed's, from each worker and the driver",
        "Processing zero checkpoint": "DeepSpeed's consolidation, a dozen lines",
        "Loading checkpoint shards": "DeepSpeed's consolidation, its tqdm bars",
        "PreemptionWatcher": "Ray Train's, an error-level line from its watcher actor",
        "exclude_resources": "Ray Data's deprecation of an option Ray Train's DatasetManager sets",
        "Started training worker group": "Ray Train's INFO lines, a few each run",
        "Setting up process group": "Ray Train's, from each rank",
        "Checkpoint successfully created": "Ray Train's, from each rank at each checkpoint",
        "Reporting training result": "Ray Train's, from each rank at each report",
        "maximum expected startup concurrency": "the raylet's, for more processes than cores",
    }
    for text, what in noise.items():
        assert text not in run.stderr, what
    export = Path(result["export"])
    assert export.is_relative_to(tmp_path / "out")
    # Tracking is off: the resolved config lies beside the export, and loads back.
    saved = load_config(train.TrainConfig, export.parent / "config.yaml")
    assert saved.schedule.max_steps == 20 and saved.data.path == str(shards)


def test_ctrl_c_stops_training_with_one_line_and_marks_the_run_killed(shards, tmp_path) -> None:
    """Ctrl-C in the middle of `mmray train`: Ray Train's own SIGINT handler aborts the run,
    then Ray raised SystemExit(1): the command exited 1 without a word and MLflow had the run
    FAILED (until 2026-12-08)."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    log_path = tmp_path / "train.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [MMRAY, "train", "--config", TINY, "--data", str(shards), "schedule.max_steps=5000",
             "schedule.global_batch=16", "eval.every=0", "output=out"],
            cwd=tmp_path, env=clean | {"MLFLOW_TRACKING_URI": store}, stdout=subprocess.PIPE,
            stderr=log, text=True,
        )  # fmt: skip
        rc = interrupt_when_logged(proc, log_path, "progress: train")
    assert rc == 130, log_path.read_text()[-3000:]
    assert "mmray train: interrupted" in log_path.read_text() and not proc.stdout.read()
    client = mlflow.MlflowClient(store)
    ids = [e.experiment_id for e in client.search_experiments()]
    assert [r.info.status for r in client.search_runs(ids)] == ["KILLED"]


def test_an_unknown_model_fails_before_ray_or_serve_start(mlflow_server, tmp_path, capsys):
    # As a user runs it: a real process, which starts no Ray and says what was not found.
    store = {"MLFLOW_TRACKING_URI": mlflow_server.url}
    t0 = time.monotonic()
    run = bare(tmp_path, "serve", "--model", "models:/mmray-tiny@champion", env=store)
    assert run.returncode == 2 and not run.stdout and time.monotonic() - t0 < 30
    assert "local Ray" not in run.stderr  # none was started
    assert f"model models:/mmray-tiny@champion was not found in the MLflow store " \
           f"{mlflow_server.url}" in run.stderr  # fmt: skip
    # The other kinds of URI, through the same check in this process.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
        for uri in ("models:/m-0123456789abcdef", "runs:/0123456789abcdef/model"):
            assert serve.main(["--model", uri]) == 2
            assert f"model {uri} was not found in the MLflow store" in capsys.readouterr().err
    with pytest.MonkeyPatch.context() as env:
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        env.chdir(tmp_path)
        assert serve.main(["--model", "models:/mmray-tiny@champion"]) == 2
        assert "there is no MLflow store at sqlite:///" in capsys.readouterr().err
        assert not (tmp_path / "mlflow.db").exists()  # looking did not create one
        assert serve.main(["--model", "no/such/folder"]) == 2
        assert "no/such/folder holds no config.json" in capsys.readouterr().err


def test_on_a_cluster_too_small_the_job_fails_before_work(shards, tmp_path, capsys) -> None:
    # The session's cluster has 4 CPUs: 4 workers leave none for Ray Data.
    args = ["--config", TINY, "--data", str(shards), *SHORT, f"output={tmp_path}",
            "scaling.num_workers=4"]  # fmt: skip
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "the Ray cluster has 4 CPU and 0 GPU; this job needs 4 CPU + at least 1 more" in err
    assert not any(tmp_path.iterdir())  # nothing was started


def test_a_training_loop_without_data_stops_with_a_diagnosis(shards, tmp_path) -> None:
    # Past the driver's check (run() directly): the 2 workers of 2 CPUs take all 4, so Ray
    # Data's tasks can never run; the loop must not wait forever.
    overrides = [f"data.path={shards}", *SHORT, f"output={tmp_path}", "scaling.cpus_per_worker=2",
                 "data.stall_timeout_s=10", "schedule.max_failures=0"]  # fmt: skip
    cfg = load_config(train.TrainConfig, TINY, overrides)
    t0 = time.monotonic()
    with pytest.raises(Exception) as e:
        train.run(cfg)
    assert "received no batch from Ray Data in 10 s" in str(e.value)
    assert "the cluster has 4 CPU, 0 free, at most 0 on one node" in str(e.value)
    assert time.monotonic() - t0 < 240
