"""The MLflow pyfunc model and model URIs through a real MLflow server on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json

import mlflow
import pandas as pd
import pytest
import torch
from PIL import Image

from mmcore import storage
from mmcore.export import save_model
from mmcore.models.model import ModelConfig, build_model
from mmcore.models.towers import TextConfig, tokenize
from mmcore.tracking import TrackingConfig, load, log_model, resolve_model, start_run


def test_pyfunc_round_trip_and_model_uris(mlflow_server, tmp_path, monkeypatch, capfd) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("MMRAY_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = build_model(ModelConfig(text=TextConfig(kind="transformer"))).eval()
    export_dir = save_model(model, tmp_path / "export")
    with start_run(TrackingConfig(experiment="test-models")):
        uri = log_model(export_dir, registered_name="test-clip")
    assert "Validating input example" not in capfd.readouterr().err  # MLflow's, every model
    client = mlflow.MlflowClient(mlflow_server.url)
    client.set_registered_model_alias("test-clip", "champion", "1")

    buf = io.BytesIO()
    Image.new("RGB", (80, 60), (200, 30, 30)).save(buf, "PNG")
    frame = pd.DataFrame(
        {"text": ["a red circle", None], "image": [None, base64.b64encode(buf.getvalue()).decode()]}
    )
    pyfunc = _load_pyfunc(uri, tmp_path)
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
        folder = resolve_model(model_uri).folder  # downloaded once, into mmray's cache
        assert folder.is_relative_to(storage.downloads_dir()) and folder.is_dir()
        assert resolve_model(model_uri).folder == folder
    assert not [p for p in storage.downloads_dir().iterdir() if p.name.startswith(".")]


def _load_pyfunc(uri: str, tmp_path):
    """MLflow's pyfunc, downloaded into the test's folder (by default MLflow leaves a copy in
    a new temporary folder each time)."""
    (tmp_path / "pyfunc").mkdir()
    return mlflow.pyfunc.load_model(uri, dst_path=str(tmp_path / "pyfunc"))


def test_pyfunc_captions_and_answers_as_the_engine(mlflow_server, tmp_path, monkeypatch) -> None:
    from mmcore.inference import Engine
    from mmcore.tasks import ANSWER, GenerationConfig

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
    pyfunc = _load_pyfunc(uri, tmp_path)
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


def test_a_sweep_crowns_its_warm_start_when_no_trial_beat_it(
    mlflow_server, tmp_path, monkeypatch
) -> None:
    """Fine-tuning can make a model worse: the trials' shared warm start competes for
    champion with its training run's last figure, but only where that run was evaluated as
    the trials are (its ``mmray.eval_setup`` tag, which ``pipelines.train`` sets)."""
    from mmcore.config import load_config
    from mmcore.tracking import EVAL_SETUP_TAG, MODEL_TAG
    from pipelines import tune

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    metric = "eval/zeroshot/shape/top1"
    client = mlflow.MlflowClient(mlflow_server.url)

    def logged(seed: int, tags: dict[str, str] | None = None, value: float = 0.0) -> tuple:
        """A run that logged a model (as a training run does), its figure and tags."""
        torch.manual_seed(seed)
        with start_run(TrackingConfig(experiment="test-crown")) as tracker:
            uri = log_model(save_model(build_model(ModelConfig()), tmp_path / f"m{seed}"))
            tracker.log_metrics({metric: value}, step=10)
            tracker.set_tags({MODEL_TAG: uri} | (tags or {}))
        return tracker.run_id, uri

    def sweep(source: str) -> tune.SweepConfig:
        trial = {"data.path": str(tmp_path), "init.from": source, "eval.max_pairs": 300}
        args = [f"trial={json.dumps(trial)}", "registered_model=test-crown"]
        return load_config(tune.SweepConfig, "pipelines/configs/tune/demo.yaml", args)

    def row(trial: str, uri: str, value: float) -> dict:
        return {"trial": trial, "status": "finished", "model_uri": uri, metric: value}

    setup = json.dumps(sweep("runs:/x/model").base.eval_setup())
    base_run, base_uri = logged(0, {EVAL_SETUP_TAG: setup}, value=0.70)
    base = sweep(base_uri)
    _, worse = logged(1)
    first = tune.crown(base, [row("t0", worse, 0.65)], "parent-1")
    assert first["crowned"] == "warm start" and first["metric"] == pytest.approx(0.70)
    champion = client.get_model_version_by_alias("test-crown", "champion")
    assert champion.run_id == base_run and champion.tags["init.from"] == base_uri

    _, better = logged(2)  # a trial that beats it is crowned, and beats the champion
    second = tune.crown(base, [row("t1", better, 0.75)], "parent-2")
    assert second["crowned"] == "t1" and second["champion_moved"]
    # The same crowning again (a restored sweep) registers nothing new and moves nothing.
    assert tune.crown(base, [row("t1", better, 0.75)], "parent-2") == second | {
        "champion_moved": False
    }

    # A warm start measured on other held-out data does not compete, whatever its figure.
    other_run, other_uri = logged(3, {EVAL_SETUP_TAG: setup.replace(str(tmp_path), "/else")}, 0.99)
    third = tune.crown(sweep(other_uri), [row("t2", worse, 0.65)], "parent-3")
    assert third["crowned"] == "t2" and not third["champion_moved"]
    champion = client.get_model_version_by_alias("test-crown", "champion")
    assert f"models:/test-crown/{champion.version}" == second["model_uri"]
