"""The tracking server as infra/mlflow deploys it: `mlflow server` with a PostgreSQL backend
store and an S3-compatible artifact store (both real servers on 127.0.0.1). mmray logs,
registers and loads a model through it, holding no storage credentials itself."""

from __future__ import annotations

import pytest
import torch

from mmcore.export import save_model
from mmcore.models.model import ModelConfig, build_model
from mmcore.models.towers import TextConfig, tokenize
from mmcore.tracking import TrackingConfig, load, log_model, resolve_model, start_run
from pipelines.local import MlflowServer
from tests.helpers import PostgresServer, S3Server

pytestmark = pytest.mark.integration


def test_models_round_trip_through_postgres_and_s3(tmp_path, monkeypatch) -> None:
    with (
        PostgresServer(tmp_path / "pg") as pg,
        S3Server(tmp_path / "s3") as s3,
        MlflowServer(
            tmp_path / "mlflow", backend=pg.uri, artifacts=f"s3://{s3.bucket}/artifacts",
            extra_env={"MLFLOW_S3_ENDPOINT_URL": s3.url, **S3Server.KEYS},
        ) as server,
    ):  # fmt: skip
        for key in S3Server.KEYS:  # the client goes through the server's artifact proxy
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        torch.manual_seed(0)
        model = build_model(ModelConfig(text=TextConfig(kind="transformer"))).eval()
        with start_run(TrackingConfig(experiment="stack")) as run:
            run.log_metrics({"eval/retrieval/i2t_r5": 0.5}, step=1)
            log_model(save_model(model, tmp_path / "export"), registered_name="stack-model")

        loaded = load("models:/stack-model/1")
        tokens = tokenize(["a red circle"], 32)
        with torch.no_grad():
            assert torch.equal(loaded.encode_text(**tokens), model.encode_text(**tokens))
        info = resolve_model("models:/stack-model/1").info()
        assert info["metrics"] == {"eval/retrieval/i2t_r5": 0.5}

        # The runs and the registry live in PostgreSQL, the files in the bucket.
        assert pg.query("select name from registered_models") == "stack-model"
        assert int(pg.query("select count(*) from runs")) == 1
        keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=s3.bucket)["Contents"]]
        assert any(k.endswith("model.safetensors") for k in keys)
