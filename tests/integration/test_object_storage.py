"""Object storage through every stage, against a real S3-compatible server on 127.0.0.1
(moto's, checking keys as S3 does; its AWS variables set as a user's would be).

A crawl whose metadata is a prefix of parquet files in a bucket is curated into shards in the
bucket, the job killed with SIGKILL and resumed there, to the same bytes as a run on local
disk; training reads those shards and keeps its checkpoints in the bucket, a worker is killed
and the run resumes from them; a sweep keeps its state and trials there and restores from
them; `mmray serve` loads the model and its search index from the bucket. Bad credentials,
a missing bucket and a missing prefix are refused before any work.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from mmcore import storage
from mmcore.config import load_config
from mmcore.data.shards import staged_rows
from mmcore.tracking import load
from pipelines.curate import CurateConfig
from pipelines.curate import run as curate
from pipelines.local import free_port
from pipelines.train import TrainConfig
from pipelines.train import run as train
from pipelines.tune import SweepConfig
from pipelines.tune import run as tune
from tests.helpers import sigkill_when, train_killing_a_worker

pytestmark = pytest.mark.integration
BUCKET = "s3://mmray"
MMRAY = str(Path(sys.executable).with_name("mmray"))
TINY = "pipelines/configs/curate_tiny.yaml"


@pytest.fixture(scope="module")
def crawl(s3, sample_dir: Path, image_server) -> str:
    """The sample crawl, its images over HTTP, its metadata as two parquet files under one
    prefix of the bucket."""
    table = pq.read_table(sample_dir / "metadata.parquet")
    urls = [f"{image_server.url}/images/{f}" for f in table.column("file").to_pylist()]
    table = table.set_column(0, "url", pa.array(urls))
    half = len(table) // 2
    for i, part in enumerate((table.slice(0, half), table.slice(half))):
        storage.write_parquet(f"{BUCKET}/raw/part-{i}.parquet", part)
    return f"{BUCKET}/raw"


# The killed run waits on the image server for the rows past HELD (all in the second
# shard) until it is killed, so the first shard is staged and the second is not, however
# fast the machine; a held answer stays within the fetch timeout.
SETTINGS = ["tracking.enabled=false", "fetch.threads=2", "fetch.timeout_s=60"]
HELD = 256


def curate_config(crawl: str, out: str) -> CurateConfig:
    return load_config(CurateConfig, TINY, [f"input.path={crawl}", f"output.path={out}",
                                            *SETTINGS])  # fmt: skip


@pytest.fixture(scope="module")
def bucket_shards(ray_cluster, crawl, image_server, sample_dir, tmp_path_factory) -> str:
    """Curate into the bucket in a real process, SIGKILL it once a shard is staged there,
    resume: the objects equal those of an uninterrupted run on local disk."""
    local = tmp_path_factory.mktemp("local") / "shards"
    reference = curate(curate_config(crawl, str(local)))
    out = f"{BUCKET}/shards"
    env = os.environ | {"RAY_ADDRESS": ray_cluster.address, "PYTHONPATH": str(Path.cwd())}
    files = pq.read_table(sample_dir / "metadata.parquet").column("file").to_pylist()
    image_server.hold, image_server.released = set(files[HELD:]), threading.Event()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.curate", "--config", TINY, "--input", crawl,
         "--output", out, *SETTINGS],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        sigkill_when(proc, lambda: _some_shard_staged(out))
    finally:
        image_server.released.set()
        image_server.hold = set()
        if proc.poll() is None:
            proc.kill()
    assert _some_shard_staged(out) and not storage.exists(f"{out}/manifest.json")
    resumed = curate(curate_config(crawl, out))
    assert 0 < resumed["processed"] < reference["n_input"]  # the staged shard was kept
    assert resumed["digest"] == reference["digest"]
    for name in ["manifest.json", "failures_by_host.csv"]:
        got, ref = storage.read_bytes(f"{out}/{name}"), (local / name).read_bytes()
        if name == "manifest.json":  # the same but for where the output went
            got, ref = json.loads(got), json.loads(ref)
            got["config"].pop("output"), ref["config"].pop("output")
        assert got == ref, name
    names = {storage.name(p) for p in storage.list_files(out)}
    assert names == {p.name for p in local.iterdir()}  # no _work, no partial objects
    for name in names - {"manifest.json"}:
        assert storage.read_bytes(f"{out}/{name}") == (local / name).read_bytes(), name
    return out


def _some_shard_staged(out: str) -> bool:
    plan = f"{out}/_work/plan.json"
    if not storage.exists(plan):
        return False
    staged = staged_rows(f"{out}/_work/pieces")
    return any(staged.get(s) == n for s, n in enumerate(storage.read_json(plan)["shard_rows"]))


def test_training_reads_the_bucket_and_resumes_from_checkpoints_there(
    bucket_shards, mlflow_server, monkeypatch
) -> None:
    """ZeRO-2 on 2 workers, shards and checkpoints in the bucket: SIGKILL a worker after the
    first checkpoint; the run resumes from the bucket's checkpoint, not from step 0, and its
    export lands in the bucket and loads from there."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    runs = f"{BUCKET}/runs"
    cfg = load_config(TrainConfig, "pipelines/configs/train/tiny.yaml", [
        f"data.path={bucket_shards}", "schedule.max_steps=16", "schedule.checkpoint_every=4",
        "schedule.log_every=1", "schedule.max_failures=1", f"output={runs}",
        "tracking.experiment=test-object-storage",
    ])  # fmt: skip
    result, _ = train_killing_a_worker(
        lambda: train(cfg), lambda: _registered_checkpoints(runs) > 0
    )
    assert result["metrics"]["step"] == 16
    steps = [m.step for m in mlflow.MlflowClient(mlflow_server.url).get_metric_history(
        result["run_id"], "train/loss")]  # fmt: skip
    assert max(steps) == 16 and steps.count(1) == 1  # resumed from a checkpoint, not step 0
    run_dir = result["export"].rsplit("/", 1)[0]
    assert run_dir.startswith(f"{runs}/train-")
    checkpoints = [c for c in _ls(run_dir) if c.startswith("checkpoint_2")]  # checkpoint_<date>
    assert checkpoints, _ls(run_dir)
    files = [storage.name(p) for p in _walk(f"{run_dir}/{sorted(checkpoints)[-1]}")]
    assert {"mp_rank_00_model_states.pt"} <= set(files)  # DeepSpeed's files, every rank's
    assert sum("optim_states" in f for f in files) == 2, files
    assert storage.exists(f"{run_dir}/config.yaml")
    exported = load(result["export"])  # the model folder in the bucket
    logged = load(result["model_uri"])  # and the copy MLflow keeps
    for (name, a), b in zip(exported.state_dict().items(), logged.state_dict().values(),
                            strict=True):  # fmt: skip
        assert a.equal(b), name


def _ls(folder: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, inner = storage.resolve(folder)
    return sorted(storage.name(i.path) for i in fs.get_file_info(pafs.FileSelector(inner)))


def _walk(folder: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, inner = storage.resolve(folder)
    found = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
    return [i.path for i in found if i.type == pafs.FileType.File]


def _registered_checkpoints(runs: str) -> int:
    """Checkpoints the Ray Train controller has registered (its snapshot in the bucket)."""
    for run in (r for r in _ls(runs) if r.startswith("train-")) if storage.exists(runs) else []:
        snapshot = f"{runs}/{run}/checkpoint_manager_snapshot.json"
        try:
            return len(storage.read_json(snapshot)["checkpoint_results"])
        except (json.JSONDecodeError, KeyError, OSError, FileNotFoundError):
            return 0
    return 0


def test_a_sweep_keeps_its_state_and_trials_in_the_bucket(
    bucket_shards, sample_dir, mlflow_server, monkeypatch
) -> None:
    """`output=s3://…` for a sweep: Tune's experiment state, the sweep's own state and every
    trial's checkpoints land in the bucket; the champion is crowned; the same sweep again
    restores from the bucket and runs no trial twice."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    trial = {"data.path": bucket_shards, "scaling.num_workers": 1, "schedule.global_batch": 16,
             "eval.every": 2, "eval.max_pairs": 32, "optim.warmup_steps": 0,
             "eval.zeroshot": [str(sample_dir / "zeroshot" / "colour")]}  # fmt: skip
    sweep = load_config(SweepConfig, "pipelines/configs/tune/tiny.yaml", [
        "name=bucket-sweep", f"output={BUCKET}/sweeps", f"trial={json.dumps(trial)}",
        "space.fusion=[late]", "space.loss=[{clip: 1.0}, {siglip: 1.0}]", "samples_per_trial=32",
        "asha.enabled=false", "registered_model=test-bucket-sweep",
        "tracking.experiment=test-object-storage",
    ])  # fmt: skip
    result = tune(sweep)
    assert result["trials"] == 2 and result["champion_moved"]
    root = f"{BUCKET}/sweeps/bucket-sweep"
    names = _ls(root)
    assert "mmray_sweep.json" in names and any(n.startswith("experiment_state") for n in names)
    runs = [r for r in _ls(f"{root}/trials") if r.startswith("train-")]
    assert len(runs) == 2, runs
    for run in runs:  # each trial's DeepSpeed checkpoint and export, in the bucket
        files = {storage.name(p) for p in _walk(f"{root}/trials/{run}")}
        assert {"mp_rank_00_model_states.pt", "config.yaml"} <= files, files
    champion = load("models:/test-bucket-sweep@champion")
    assert champion.cfg.fusion == "late"
    again = tune(sweep)
    assert again["run_id"] == result["run_id"] and again["trials"] == 2
    assert [r for r in _ls(f"{root}/trials") if r.startswith("train-")] == runs


def test_serve_loads_the_model_and_the_search_index_from_the_bucket(
    bucket_shards, tmp_path
) -> None:
    from mmcore.export import save_model
    from mmcore.models.model import ModelConfig, build_model
    from mmcore.models.towers import TextConfig

    model = f"{BUCKET}/models/random"
    random_init = build_model(ModelConfig(text=TextConfig(kind="transformer")))
    local = save_model(random_init, tmp_path / "model")
    storage.upload_dir(local, model)
    port = free_port()
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - lives with the process
    proc = subprocess.Popen(
        [MMRAY, "serve", "--model", model, "--index", bucket_shards, "--port", str(port),
         "replicas.max_replicas=1"],
        stdout=subprocess.PIPE, stderr=log, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()  # one JSON line once the app is up
        assert line, f"mmray serve exited: {(tmp_path / 'serve.log').read_text()[-3000:]}"
        url = json.loads(line)["url"]
        info = requests.get(f"{url}/v1/model", timeout=30).json()
        manifest = storage.read_json(f"{bucket_shards}/manifest.json")
        assert info["index_size"] == manifest["n_samples"], info
        hits = requests.post(f"{url}/v1/search", json={"text": "a red circle", "k": 3},
                             timeout=60).json()["hits"]  # fmt: skip
        assert len(hits) == 3 and all(h["caption"] for h in hits)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize(
    ("args", "keys", "message"),
    [
        (["--input", f"{BUCKET}/raw"], {"AWS_SECRET_ACCESS_KEY": "not-the-secret-4f9c"},
         "cannot read s3://mmray/raw"),
        (["--input", "s3://no-such-bucket/raw"], {}, "the bucket 'no-such-bucket' does not exist"),
        (["--input", f"{BUCKET}/no/such/prefix"], {}, "s3://mmray/no/such/prefix does not exist"),
        (["--input", f"{BUCKET}/raw", "--output", "s3://no-such-bucket/out"], {},
         "cannot write to s3://no-such-bucket/out"),
    ],
)  # fmt: skip
def test_bad_credentials_or_missing_paths_fail_before_any_work(crawl, args, keys, message) -> None:
    argv = ["--output", f"{BUCKET}/never", *args]
    env = os.environ | keys | {"RAY_ADDRESS": "127.0.0.1:1"}  # no Ray is reached: refused first
    run = subprocess.run([MMRAY, "curate", *argv, "tracking.enabled=false"],
                         capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert run.returncode == 2, run.stderr[-2000:]
    assert message in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    if keys:
        assert "not-the-secret-4f9c" not in run.stderr  # a secret is never printed
    assert not storage.exists(f"{BUCKET}/never")
