"""The MLflow pyfunc model and model URIs through a real MLflow server on 127.0.0.1."""

from __future__ import annotations

import base64
import io

import mlflow
import pandas as pd
import torch
from PIL import Image

from mmcore.export import save_model
from mmcore.models.model import ModelConfig, build_model
from mmcore.models.towers import TextConfig, tokenize
from mmcore.tracking import TrackingConfig, load, log_model, start_run


def test_pyfunc_round_trip_and_model_uris(mlflow_server, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    torch.manual_seed(0)
    model = build_model(ModelConfig(text=TextConfig(kind="transformer"))).eval()
    export_dir = save_model(model, tmp_path / "export")
    with start_run(TrackingConfig(experiment="test-models")):
        uri = log_model(export_dir, registered_name="test-clip")
    client = mlflow.MlflowClient(mlflow_server.url)
    client.set_registered_model_alias("test-clip", "champion", "1")

    buf = io.BytesIO()
    Image.new("RGB", (80, 60), (200, 30, 30)).save(buf, "PNG")
    frame = pd.DataFrame(
        {"text": ["a red circle", None], "image": [None, base64.b64encode(buf.getvalue()).decode()]}
    )
    pyfunc = mlflow.pyfunc.load_model(uri)
    out = pyfunc.predict(frame)
    with torch.no_grad():
        expected = model.encode_text(**tokenize(["a red circle"], 32))[0]
    torch.testing.assert_close(
        torch.tensor(out.loc[0, "text_embedding"]), expected, rtol=1e-5, atol=1e-6
    )
    assert len(out.loc[1, "image_embedding"]) == 128
    probs = pyfunc.predict(frame, params={"labels": ["red", "blue", "green"]}).loc[1, "probs"]
    assert len(probs) == 3 and abs(sum(probs) - 1) < 1e-5

    for model_uri in (uri, "models:/test-clip@champion"):
        loaded = load(model_uri)
        with torch.no_grad():
            torch.testing.assert_close(
                loaded.encode_text(**tokenize(["a red circle"], 32))[0], expected
            )
