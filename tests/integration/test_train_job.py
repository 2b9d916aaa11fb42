"""The training job: Ray Train + DeepSpeed ZeRO on 2 workers over curated shards.

One local Ray cluster for the module (4 logical CPUs: 2 training workers + Ray Data tasks),
shards curated from the sample crawl, and a real MLflow server on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import ray

from mmcore.config import load_config
from mmcore.tracking import load
from pipelines import evaluate
from pipelines.local import curated_shards
from pipelines.train import TrainConfig, run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def shards(sample_dir, tmp_path_factory):
    ray.init(
        num_cpus=4, object_store_memory=300 << 20, include_dashboard=False, log_to_driver=False
    )
    yield curated_shards(sample_dir, tmp_path_factory.mktemp("shards"))
    ray.shutdown()


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_run_finishes_logs_and_exports(
    stage, shards, sample_dir, mlflow_server, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    colour = sample_dir / "zeroshot" / "colour"
    cfg = load_config(TrainConfig, "pipelines/configs/train/tiny.yaml", [
        f"data.path={shards}", f"deepspeed.stage={stage}", "schedule.max_steps=4",
        "schedule.checkpoint_every=2", "schedule.log_every=1", "schedule.global_batch=16",
        f"data.val_path={shards}", "eval.every=2", f"eval.zeroshot=[{colour}]",
        "eval.max_pairs=1000", f"output={tmp_path}", "tracking.experiment=test-train",
    ])  # fmt: skip
    result = run(cfg)

    client = mlflow.MlflowClient(mlflow_server.url)
    history = client.get_metric_history(result["run_id"], "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]  # rank 0 only: one value per step
    for name in ("train/lr", "train/logit_scale", "train/grad_norm", "train/data_wait_s"):
        assert client.get_metric_history(result["run_id"], name), name
    seen = client.get_metric_history(result["run_id"], "train/samples_seen")
    assert sorted(m.value for m in seen) == [16, 32, 48, 64]
    logged = {}  # the last evaluation's metrics, as MLflow has them
    for name in ("eval/zeroshot/colour/top1", "eval/retrieval/i2t_r5", "eval/retrieval/t2i_r1"):
        history = client.get_metric_history(result["run_id"], name)
        assert sorted(m.step for m in history) == [2, 4], name  # every 2 steps, rank 0 only
        logged[name] = max(history, key=lambda m: m.step).value
    run_ = client.get_run(result["run_id"])
    assert run_.data.params["deepspeed.stage"] == str(stage)
    assert run_.data.tags["version.deepspeed"] and len(run_.data.tags["git_sha"]) == 40
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["digest"].startswith(run_.inputs.dataset_inputs[0].dataset.digest)
    path = mlflow.artifacts.download_artifacts(
        run_id=result["run_id"],
        artifact_path="deepspeed_config.json",
        tracking_uri=mlflow_server.url,
    )
    ds_cfg = json.loads(open(path).read())
    assert ds_cfg["zero_optimization"]["stage"] == stage and ds_cfg["train_batch_size"] == 16
    assert result["metrics"]["step"] == 4

    # checkpoint → consolidated export → `mmray eval` gives the metrics the run logged
    assert load(result["model_uri"]).cfg.text.frozen  # runs:/ID/model
    uri = result["model_uri"]
    assert evaluate.main(["zeroshot", "--model", uri, "--image-folder", str(colour)]) == 0
    zeroshot = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert zeroshot["n_classes"] == 6
    assert zeroshot["top1"] == pytest.approx(logged["eval/zeroshot/colour/top1"], abs=1e-6)
    assert evaluate.main(["retrieval", "--model", uri, "--data", str(shards)]) == 0
    retrieval = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert retrieval["i2t_r@5"] == pytest.approx(logged["eval/retrieval/i2t_r5"], abs=1e-6)
    assert retrieval["t2i_r@1"] == pytest.approx(logged["eval/retrieval/t2i_r1"], abs=1e-6)


def test_a_killed_worker_resumes_from_the_last_checkpoint(
    shards, mlflow_server, tmp_path, monkeypatch
):
    """SIGKILL a real training worker after the first checkpoint: the run must finish, having
    resumed from a checkpoint rather than from step 0."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    cfg = load_config(TrainConfig, "pipelines/configs/train/tiny.yaml", [
        f"data.path={shards}", "schedule.max_steps=80", "schedule.checkpoint_every=5",
        "schedule.log_every=1", "schedule.global_batch=16", "schedule.max_failures=1",
        f"output={tmp_path}", "tracking.experiment=test-train-failure",
    ])  # fmt: skip
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=run(cfg)), daemon=True)
    thread.start()
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and thread.is_alive() and time.monotonic() < deadline:
        if _registered_checkpoints(tmp_path):
            workers = [p for p in psutil.process_iter(["cmdline"])
                       if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]  # fmt: skip
            if workers:
                killed = workers[-1].pid
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    thread.join(timeout=600)
    assert killed is not None, "no checkpoint and worker to kill before the run ended"
    result = box["result"]
    assert result["metrics"]["step"] == 80
    client = mlflow.MlflowClient(mlflow_server.url)
    history = client.get_metric_history(result["run_id"], "train/loss")
    steps = [m.step for m in history]
    assert max(steps) == 80 and steps.count(1) == 1  # resumed from a checkpoint, not step 0
    assert not psutil.pid_exists(killed)
    # The resumed run continued the epoch where the checkpoint left it: the epoch of every
    # logged step, before and after the restart, is that of one uninterrupted pass.
    epochs = {(m.step, m.value) for m in client.get_metric_history(result["run_id"], "train/epoch")}
    per_epoch = min(step for step, epoch in epochs if epoch == 1) - 1  # optimizer steps
    assert per_epoch > 5 and max(epoch for _, epoch in epochs) >= 2
    assert all(epoch == (step - 1) // per_epoch for step, epoch in epochs)


def _registered_checkpoints(storage) -> int:
    """Checkpoints the Ray Train controller has registered (its snapshot file). A checkpoint
    folder alone is not enough: the controller registers reports when it next polls the
    workers, and a worker group that dies before that restarts from scratch."""
    for path in storage.glob("train-*/checkpoint_manager_snapshot.json"):
        try:
            return len(json.loads(path.read_text())["checkpoint_results"])
        except (json.JSONDecodeError, KeyError, OSError):  # being written
            return 0
    return 0


def test_python_dash_m_driver_joins_the_cluster(shards, tmp_path) -> None:
    """The user's path (`python -m pipelines.train`, as under `ray job submit`): a separate
    driver process on the running cluster. Its config classes live in __main__ there, which
    once broke the workers' unpickling."""
    env = os.environ | {"RAY_ADDRESS": ray.get_runtime_context().gcs_address,
                        "PYTHONPATH": str(Path.cwd())}  # fmt: skip
    cmd = [sys.executable, "-m", "pipelines.train", "--config", "pipelines/configs/train/tiny.yaml",
           "--data", str(shards), "schedule.max_steps=2", "schedule.checkpoint_every=2",
           "schedule.global_batch=16", f"output={tmp_path}", "tracking.enabled=false"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["metrics"]["step"] == 2
    assert (Path(result["export"]) / "model.safetensors").exists()
