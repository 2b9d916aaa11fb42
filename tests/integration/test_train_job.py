"""The training job: Ray Train + DeepSpeed ZeRO on 2 workers over curated shards.

One local Ray cluster for the module (4 logical CPUs: 2 training workers + Ray Data tasks),
shards curated from the sample crawl, and a real MLflow server on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import psutil
import pytest
import torch
import webdataset as wds
from PIL import Image

from mmcore.config import load_config
from mmcore.eval.run import zeroshot_eval
from mmcore.tracking import EVAL_SETUP_TAG, load
from pipelines import evaluate
from pipelines.train import TrainConfig, run
from pipelines.train import main as train_main
from tests.helpers import train_killing_a_worker

pytestmark = pytest.mark.integration


def test_zero2_run_finishes_logs_and_exports(
    shards, sample_dir, mlflow_server, tmp_path, monkeypatch, capsys
):
    stage = 2
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    colour = sample_dir / "zeroshot" / "colour"
    cfg = load_config(TrainConfig, "pipelines/configs/train/tiny.yaml", [
        f"data.path={shards}", f"deepspeed.stage={stage}", "schedule.max_steps=4",
        "schedule.checkpoint_every=2", "schedule.log_every=1", "schedule.global_batch=16",
        f"data.val_path={shards}", "eval.every=2", f"eval.zeroshot=[{colour}]",
        "eval.max_pairs=1000", f"output={tmp_path}", "tracking.experiment=test-train",
        f"data.text_cache_dir={tmp_path / 'text'}",
    ])  # fmt: skip
    result = run(cfg)
    # each worker left its captions' text features for the next run of this text tower
    assert sorted(p.name for p in (tmp_path / "text").glob("*/*")) == ["rank-0.pt", "rank-1.pt"]

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
        dst_path=str(tmp_path),
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


def test_a_vqa_run_trains_the_decoder_and_logs_its_metrics(
    shards, mlflow_server, tmp_path, monkeypatch, capsys
):
    """``vqa`` trains on each sample's questions (here debiased by the questions' answer priors,
    which the second step has); evaluation logs VQA and caption metrics (a sweep compares every
    decoder on both); the export records its objectives."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    tiny = "pipelines/configs/train/tiny.yaml"
    args = [
        f"data.path={shards}", f"data.val_path={shards}", "model.fusion=hybrid",
        "loss.terms={clip: 1.0, vqa: 1.0}", "loss.vqa_debias=true", "schedule.max_steps=2",
        "schedule.checkpoint_every=2", "schedule.global_batch=16", "eval.max_pairs=64",
        f"output={tmp_path / 'a'}", "tracking.experiment=test-train-vqa",
    ]  # fmt: skip
    result = run(load_config(TrainConfig, tiny, args))
    client = mlflow.MlflowClient(mlflow_server.url)
    vqa = client.get_metric_history(result["run_id"], "train/vqa")
    assert vqa and all(0 < m.value < 20 for m in vqa)
    for name in ("eval/vqa/accuracy", "eval/caption/bleu4", "eval/caption/cider"):
        (logged,) = client.get_metric_history(result["run_id"], name)
        assert logged.step == 2 and 0 <= logged.value, name
    assert load(result["model_uri"]).objectives == {"clip", "vqa"}
    # its decoder learnt answers, not captions: captioning is refused with the reason
    assert evaluate.main(["caption", "--model", result["model_uri"], "--data", str(shards)]) == 2
    assert "not trained with the caption objective" in capsys.readouterr().err

    # vqa on shards without questions fails before any work
    plain = tmp_path / "plain"
    plain.mkdir()
    with wds.TarWriter(str(plain / "00000.tar")) as sink:
        sink.write({"__key__": "000000000", "jpg": Image.new("RGB", (64, 64)), "txt": "a b",
                    "json": {"key": "000000000"}})  # fmt: skip
    argv = ["--config", tiny, "--data", str(plain), "model.fusion=hybrid",
            "loss.terms={clip: 1.0, vqa: 1.0}", f"output={tmp_path / 'b'}"]  # fmt: skip
    assert train_main(argv) == 2
    assert "have no questions" in capsys.readouterr().err


def test_a_warm_start_at_lr_0_keeps_the_source_weights_and_metrics(
    shards, sample_dir, mlflow_server, tmp_path, monkeypatch, capsys
):
    """``init.from=runs:/...`` with lr 0: the run starts from the source's weights, keeps them,
    and evaluates exactly as the source's last evaluation did; MLflow has the lineage. (The
    patch stem: a conv stem's BatchNorm statistics move in training even at lr 0.)"""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    common = [
        f"data.path={shards}", f"data.val_path={shards}", "model.vision.stem=patch",
        "schedule.global_batch=16", f"eval.zeroshot=[{sample_dir / 'zeroshot' / 'shape'}]",
        "eval.max_pairs=1000", "tracking.experiment=test-train-init",
    ]  # fmt: skip
    tiny = "pipelines/configs/train/tiny.yaml"
    source = run(load_config(TrainConfig, tiny, [*common, "schedule.max_steps=3",
                                                 "schedule.checkpoint_every=3",
                                                 f"output={tmp_path / 'a'}"]))  # fmt: skip
    warm_args = [*common, "schedule.max_steps=1", "schedule.checkpoint_every=1", "optim.lr=0",
                 f"init.from={source['model_uri']}", f"output={tmp_path / 'b'}"]  # fmt: skip
    warm = run(load_config(TrainConfig, tiny, warm_args))

    evals = {k: v for k, v in source["metrics"].items() if k.startswith("eval/")}
    assert evals and {k: warm["metrics"][k] for k in evals} == pytest.approx(evals, abs=1e-6)
    before, after = load(source["model_uri"]).state_dict(), load(warm["model_uri"]).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    run_ = mlflow.MlflowClient(mlflow_server.url).get_run(warm["run_id"])
    assert run_.data.params["init.from"] == source["model_uri"]
    assert run_.data.tags["mmray.init.run_id"] == source["run_id"]
    # how its figures were measured, for a sweep warm-started from it to compare them
    setup = load_config(TrainConfig, tiny, warm_args).eval_setup()
    assert json.loads(run_.data.tags[EVAL_SETUP_TAG]) == setup
    init = mlflow.artifacts.load_dict(f"runs:/{warm['run_id']}/init.json")
    assert init["fresh"] == [] and len(init["loaded"]) == len(before)

    # A source that is not there, or does not fit, fails before any work (exit 2).
    assert train_main(["--config", tiny, "--data", str(shards), "init.from=runs:/nope/model",
                       f"output={tmp_path / 'c'}"]) == 2  # fmt: skip
    assert "init.from" in capsys.readouterr().err
    hybrid = ["model.fusion=hybrid", "model.vision.stem=patch", "loss.terms={clip: 1.0, itm: 1.0}"]
    assert (
        train_main(
            [
                "--config",
                tiny,
                "--data",
                str(shards),
                *hybrid,
                f"init.from={source['model_uri']}",
                f"output={tmp_path / 'c'}",
            ]
        )
        == 2
    )
    assert "image_to_fusion.weight: not in the source" in capsys.readouterr().err


def test_a_killed_zero3_worker_resumes_from_its_partitioned_checkpoint(
    shards, sample_dir, mlflow_server, tmp_path, monkeypatch
):
    """ZeRO-3 with optimizer offload and 2 micro-batches per step, evaluating as it goes:
    SIGKILL a real training worker after the first checkpoint; the run must finish, having
    resumed from the ranks' partitioned checkpoint rather than from step 0."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    cfg = load_config(TrainConfig, "pipelines/configs/train/tiny.yaml", [
        f"data.path={shards}", "schedule.max_steps=30", "schedule.checkpoint_every=5",
        "schedule.log_every=1", "schedule.global_batch=16", "schedule.max_failures=1",
        "deepspeed.stage=3", "deepspeed.grad_accum=2", "deepspeed.offload_optimizer=true",
        "eval.every=15", f"eval.zeroshot=[{sample_dir / 'zeroshot' / 'colour'}]",
        f"output={tmp_path}", "tracking.experiment=test-train-failure",
    ])  # fmt: skip
    result, killed = train_killing_a_worker(
        lambda: run(cfg), lambda: _registered_checkpoints(tmp_path) > 0
    )
    assert result["metrics"]["step"] == 30
    client = mlflow.MlflowClient(mlflow_server.url)
    history = client.get_metric_history(result["run_id"], "train/loss")
    steps = [m.step for m in history]
    assert max(steps) == 30 and steps.count(1) == 1  # resumed from a checkpoint, not step 0
    assert set(steps) == set(range(1, 31))  # one optimizer step per 2 micro-batches, each logged
    params = client.get_run(result["run_id"]).data.params
    assert (params["deepspeed.stage"], params["deepspeed.grad_accum"]) == ("3", "2")
    # The export consolidated from the partitioned checkpoint scores as the run's last
    # evaluation (the weights ZeRO-3 gathered then) did.
    zs = zeroshot_eval(load(result["model_uri"]), sample_dir / "zeroshot" / "colour")
    logged = client.get_metric_history(result["run_id"], "eval/zeroshot/colour/top1")
    assert zs["top1"] == pytest.approx(max(logged, key=lambda m: m.step).value, abs=1e-6)
    assert not psutil.pid_exists(killed)
    # The resumed run continued the epoch where the checkpoint left it: the epoch of every
    # logged step, before and after the restart, is that of one uninterrupted pass.
    epochs = {(m.step, m.value) for m in client.get_metric_history(result["run_id"], "train/epoch")}
    per_epoch = min(step for step, epoch in epochs if epoch == 1) - 1  # optimizer steps
    assert per_epoch > 5 and max(epoch for _, epoch in epochs) >= 1  # an epoch boundary crossed
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


def test_python_dash_m_driver_reproduces_the_loss_curve(
    ray_cluster, shards, mlflow_server, tmp_path, monkeypatch
) -> None:
    """The user's path (`python -m pipelines.train`, as under `ray job submit`): a separate
    driver process on the running cluster (its config classes live in __main__ there, which
    once broke the workers' unpickling). With the same config and seed it gives the loss curve
    of the same run made in this process: a golden check, as torchtitan's loss-curve tests.
    This process's run holds the small shards in the object store (read once,
    data.hold_fraction=1); the other reads them every epoch: the batches are the same, past
    the first epoch too (20 steps of 16 of the ~230 training rows)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    overrides = [f"data.path={shards}", "data.deterministic=true", "scaling.num_workers=1",
                 "schedule.max_steps=20", "schedule.checkpoint_every=20", "schedule.log_every=1",
                 "schedule.global_batch=16", "eval.every=0", f"output={tmp_path}",
                 "tracking.experiment=test-train-golden", "schedule.seed=7"]  # fmt: skip
    here = run(load_config(TrainConfig, "pipelines/configs/train/tiny.yaml",
                           [*overrides, "data.hold_fraction=1"]))  # fmt: skip

    env = os.environ | {"RAY_ADDRESS": ray_cluster.address, "PYTHONPATH": str(Path.cwd())}
    cmd = [sys.executable, "-m", "pipelines.train", "--config", "pipelines/configs/train/tiny.yaml",
           *overrides]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    there = json.loads(proc.stdout)  # the one line on stdout
    assert there["metrics"]["step"] == 20
    assert (Path(there["export"]) / "model.safetensors").exists()

    client = mlflow.MlflowClient(mlflow_server.url)
    curves = [
        [m.value for m in sorted(client.get_metric_history(r["run_id"], "train/loss"),
                                 key=lambda m: m.step)]
        for r in (here, there)
    ]  # fmt: skip
    assert len(curves[0]) == 20 and curves[0][0] != curves[0][-1]
    assert curves[1] == pytest.approx(curves[0], rel=1e-4)


def test_each_epoch_draws_new_batches_of_the_same_rows(ray_cluster, shards) -> None:
    """data.shuffle_buffer: a worker draws its batches at random from a buffer, so epochs
    differ in which rows share a batch (the contrastive loss's negatives); without it every
    epoch repeats the same batches. Under data.deterministic each row's crop is the same
    every epoch, so a row is known by its pixels, and the draws repeat with the seed."""
    import hashlib

    from pipelines.train import _datasets, shuffled

    def epochs(buffer: int, seed: int = 7) -> list[list[frozenset[str]]]:
        cfg = load_config(TrainConfig, "pipelines/configs/train/tiny.yaml", [
            f"data.path={shards}", "data.deterministic=true", f"data.shuffle_buffer={buffer}",
            f"schedule.seed={seed}",
        ])  # fmt: skip
        train = _datasets(cfg)["train"]
        return [
            [
                frozenset(hashlib.sha1(p.numpy().tobytes()).hexdigest() for p in b["pixels"])
                for b in train.iter_torch_batches(batch_size=8, **shuffled(cfg, 0, epoch))
            ]
            for epoch in range(2)
        ]

    fixed = epochs(0)
    assert fixed[0] == fixed[1] and len(fixed[0]) > 10  # the same batches, in the same order
    drawn = epochs(64)
    rows = [frozenset().union(*epoch) for epoch in drawn]
    assert rows[0] == rows[1] == frozenset().union(*fixed[0])  # every row, once an epoch
    assert sum(len(batch) for batch in drawn[0]) == len(rows[0])
    assert len(set(drawn[0]) & set(drawn[1])) <= len(drawn[0]) // 4  # new batches
    assert len(set(drawn[0]) & set(fixed[0])) <= len(drawn[0]) // 4
    assert epochs(64) == drawn  # the seed decides the draws
    assert epochs(64, seed=8)[0] != drawn[0]
