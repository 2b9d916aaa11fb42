"""The MLflow pyfunc model and model URIs through a real MLflow server on 127.0.0.1."""

from __future__ import annotations

import base64
import io

import mlflow
import pandas as pd
import pytest
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


def test_pyfunc_captions_and_answers_as_the_engine(mlflow_server, tmp_path, monkeypatch) -> None:
    from mmcore.generate import ANSWER, GenerationConfig
    from mmcore.inference import Engine

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    torch.manual_seed(1)
    model = build_model(ModelConfig(fusion="hybrid", text=TextConfig(kind="transformer"))).eval()
    with start_run(TrackingConfig(experiment="test-models")):
        uri = log_model(save_model(model, tmp_path / "export"))
    images = [Image.new("RGB", (64, 48), c) for c in ((200, 30, 30), (30, 30, 200))]
    encoded = []
    for image in images:
        buf = io.BytesIO()
        image.save(buf, "PNG")
        encoded.append(base64.b64encode(buf.getvalue()).decode())
    pyfunc = mlflow.pyfunc.load_model(uri)
    params = {"task": "caption", "num_beams": 2, "max_new_tokens": 6}
    out = pyfunc.predict(pd.DataFrame({"image": encoded}), params=params)
    want = Engine(model).caption(images, GenerationConfig(num_beams=2, max_new_tokens=6))
    assert out["caption"].tolist() == [t for t, _ in want]
    assert out["score"].tolist() == pytest.approx([s for _, s in want], abs=1e-5)

    questions = ["what colour is the circle?", "how many shapes are there?"]
    frame = pd.DataFrame({"image": encoded, "question": questions})
    out = pyfunc.predict(frame, params={"task": "vqa", "max_new_tokens": 4})
    want = Engine(model).answer(images, questions, GenerationConfig(max_new_tokens=4))
    assert out["answer"].tolist() == [t for t, _ in want]
    assert out["score"].tolist() == pytest.approx([s for _, s in want], abs=1e-5)
    out = pyfunc.predict(frame, params={"task": "vqa"})  # an answer's default token budget
    want = Engine(model).answer(images, questions, ANSWER)
    assert out["answer"].tolist() == [t for t, _ in want]
    out = pyfunc.predict(pd.DataFrame({"image": encoded}), params={"task": "caption"})
    assert out["caption"].tolist() == [t for t, _ in Engine(model).caption(images)]
    with pytest.raises(Exception, match="needs a question"):
        pyfunc.predict(pd.DataFrame({"image": encoded}), params={"task": "vqa"})
