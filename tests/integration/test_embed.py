"""`mmray embed`: batch inference over curated shards on the session's real Ray (decoding in
Ray Data tasks, the model in an actor pool), a model resolved from a real MLflow server's
registry, parquet parts that resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
import torch

from mmcore.config import load_config
from mmcore.data.shards import read_shards
from mmcore.export import save_model
from mmcore.inference import Transforms
from mmcore.models.model import ModelConfig, build_model
from mmcore.models.towers import TextConfig
from mmcore.tracking import TrackingConfig, log_model, start_run
from mmcore.vectors import VectorIndex, locate
from pipelines import embed, index
from pipelines.embed import EmbedConfig
from pipelines.index import IndexConfig
from pipelines.local import free_port

pytestmark = pytest.mark.integration
NAME = "test-embed"
MMRAY = str(Path(sys.executable).with_name("mmray"))


def _model(seed: int, fusion: str = "late") -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(fusion=fusion, text=TextConfig(kind="transformer")))


def _parts(out: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted((out / "parts").glob("*.parquet")))


@pytest.fixture(scope="module")
def models(mlflow_server, tmp_path_factory) -> Iterator[dict[int, torch.nn.Module]]:
    """Registered versions: 1 a late-fusion model (alias champion), 2 a hybrid. The module's
    tests (and the processes they start) use the MLflow server."""
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server.url
    folder, models = tmp_path_factory.mktemp("models"), {}
    for version, fusion in enumerate(["late", "hybrid"], start=1):
        models[version] = _model(version, fusion)
        export = save_model(models[version], folder / f"model{version}")
        with start_run(TrackingConfig(experiment="test-embed")):
            log_model(export, registered_name=NAME)
    mlflow.MlflowClient(mlflow_server.url).set_registered_model_alias(NAME, "champion", "1")
    yield models
    del os.environ["MLFLOW_TRACKING_URI"]


def test_embeddings_equal_the_models_encoders_and_a_rerun_resumes(
    ray_cluster, shards, mlflow_server, models, tmp_path
) -> None:
    out = tmp_path / "embeddings"
    values = {"model": f"models:/{NAME}@champion", "data": str(shards), "output": str(out),
              "compute.batch_size": 32, "tracking.experiment": "test-embed"}  # fmt: skip
    cfg = load_config(EmbedConfig, None, values=values)
    result = embed.work(cfg)

    # Every sample once, in parts naming the resolved version; the manifest written last.
    n = json.loads((shards / "manifest.json").read_text())["n_samples"]
    table = _parts(out)
    assert result["rows"] == result["new_rows"] == table.num_rows == n
    assert len(set(table.column("key").to_pylist())) == n
    assert result["model_version"] == f"models:/{NAME}/1"
    for part in (out / "parts").glob("*.parquet"):
        assert pq.read_schema(part).metadata[b"mmray.model"] == f"models:/{NAME}/1".encode()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == n and manifest["alignment"] == "cosine"
    assert len(manifest["parts"]) == len(list((out / "parts").glob("*.parquet")))

    # The model's own encoders over the same shards, with inference's transforms.
    keys, images, captions = read_shards(shards)
    model, transforms = models[1].eval(), Transforms.of(models[1].cfg)
    with torch.no_grad():
        image = model.encode_image(transforms.pixels(images)).numpy()
        text = model.encode_text(*transforms.tokens(captions)).numpy()
    row = {k: i for i, k in enumerate(table.column("key").to_pylist())}
    order = [row[k] for k in keys]
    got = {c: np.stack(table.column(c).to_numpy(zero_copy_only=False))[order]
           for c in ("image_embedding", "text_embedding")}  # fmt: skip
    np.testing.assert_allclose(got["image_embedding"], image, atol=1e-5)
    np.testing.assert_allclose(got["text_embedding"], text, atol=1e-5)
    alignment = table.column("alignment").to_numpy()[order]
    np.testing.assert_allclose(alignment, (image * text).sum(1), atol=1e-5)

    # MLflow: the run's counts and the model version as lineage.
    run = mlflow.MlflowClient(mlflow_server.url).get_run(result["run_id"])
    assert run.data.metrics["rows"] == n and run.data.tags["mmray.model_uri"] == f"models:/{NAME}/1"
    assert [i.dataset.digest for i in run.inputs.dataset_inputs]  # the curated set

    # A part lost and one cut short: a rerun does exactly their samples again.
    parts = sorted((out / "parts").glob("*.parquet"))
    lost = pq.read_table(parts[0]).num_rows + pq.read_table(parts[1]).num_rows
    parts[0].unlink()
    parts[1].write_bytes(parts[1].read_bytes()[:100])
    again = embed.work(cfg)
    assert again["new_rows"] == lost and again["rows"] == n
    assert _parts(out).num_rows == n and len(set(_parts(out).column("key").to_pylist())) == n

    # Another model version into the same output is refused; the hybrid's alignment is ITM.
    with pytest.raises(ValueError, match="holds embeddings of models:/test-embed/1"):
        embed.work(load_config(EmbedConfig, None, values=values | {"model": f"models:/{NAME}/2"}))
    hybrid = embed.work(load_config(EmbedConfig, None, values=values | {
        "model": f"models:/{NAME}/2", "output": str(tmp_path / "hybrid")}))  # fmt: skip
    assert hybrid["rows"] == n
    assert json.loads((tmp_path / "hybrid" / "manifest.json").read_text())["alignment"] == "itm"
    probs = _parts(tmp_path / "hybrid").column("alignment").to_numpy()
    assert ((probs >= 0) & (probs <= 1)).all()


def test_an_index_of_the_embeddings_is_logged_with_its_model_and_serves_search(
    ray_cluster, shards, mlflow_server, models, tmp_path
) -> None:
    """mmray index → an artifact of model version 1's run, the version tagged with it; Serve
    loads it from MLflow and answers /v1/search with exact search's hits; for version 2 the
    index is refused before anything starts."""
    out = tmp_path / "embeddings"
    embed.work(load_config(EmbedConfig, None, values={
        "model": f"models:/{NAME}/1", "data": str(shards), "output": str(out)}))  # fmt: skip
    built = index.work(IndexConfig(embeddings=str(out), output=str(tmp_path / "index")))
    client = mlflow.MlflowClient(mlflow_server.url)
    run_id = client.get_model_version(NAME, "1").run_id
    assert built["artifact_uri"] == f"runs:/{run_id}/indexes/embeddings" and built["kind"] == "flat"
    assert (
        client.get_model_version(NAME, "1").tags["mmray.index.embeddings"] == built["artifact_uri"]
    )
    folder = locate(built["artifact_uri"])
    loaded = VectorIndex.load(folder, f"models:/{NAME}/1")
    assert loaded.keys == sorted(_parts(out).column("key").to_pylist())
    with pytest.raises(ValueError, match=f"built from models:/{NAME}/1's embeddings"):
        VectorIndex.load(folder, f"models:/{NAME}/2")

    # Exact search with the model itself: its image embeddings against the query's.
    table = _parts(out).sort_by("key")
    images = np.stack(table.column("image_embedding").to_numpy(zero_copy_only=False))
    model = models[1].eval()
    with torch.no_grad():
        query = model.encode_text(*Transforms.of(model.cfg).tokens(["a red circle"]))[0].numpy()
    exact = [table.column("key")[int(i)].as_py() for i in np.argsort(-(images @ query))[:5]]

    port, log = free_port(), open(tmp_path / "serve.log", "w")  # noqa: SIM115
    cmd = [MMRAY, "serve", "--model", f"models:/{NAME}/1", "--index", built["artifact_uri"],
           "--port", str(port), "replicas.max_replicas=1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = proc.stdout.readline()  # one JSON line once the app is up
        assert line, f"mmray serve exited: {(tmp_path / 'serve.log').read_text()[-3000:]}"
        url = json.loads(line)["url"]
        assert requests.get(f"{url}/v1/model", timeout=30).json()["index_size"] == len(table)
        hits = requests.post(f"{url}/v1/search", json={"text": "a red circle", "k": 5},
                             timeout=60).json()["hits"]  # fmt: skip
        assert [h["key"] for h in hits] == exact and all(h["caption"] for h in hits)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    other = subprocess.run([*cmd[:3], f"models:/{NAME}/2", *cmd[4:]], capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert other.returncode == 2 and f"built from models:/{NAME}/1's embeddings" in other.stderr


def test_bad_input_fails_before_any_work(shards, tmp_path, capsys) -> None:
    gated = save_model(_model(0, "gated"), tmp_path / "gated")
    base = ["--data", str(shards), "--output", str(tmp_path / "out"), "tracking.enabled=false"]
    assert embed.main(["--model", str(gated), *base]) == 2
    assert "fusion=gated) has no image and text embeddings" in capsys.readouterr().err
    assert embed.main(["--model", str(tmp_path / "nothing"), *base]) == 2
    assert "holds no config.json" in capsys.readouterr().err
    assert embed.main(["--model", str(gated), "--output", str(tmp_path / "o")]) == 2
    assert "--data required" in capsys.readouterr().err
    assert embed.main(["--model", str(gated), *base, "compute.batch_size=0"]) == 2
    assert "batch_size must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
