"""The Serve application as a user deploys it: `serve deploy` of a Serve config onto a real
local Ray cluster, models from a real MLflow server by alias, real HTTP on 127.0.0.1, and the
page in a real headless Chromium."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pytest
import requests
import torch
import yaml
from PIL import Image

from mmcore.data.sample import _png_header_only
from mmcore.export import save_model
from mmcore.inference import Engine
from mmcore.models.model import ModelConfig, build_model
from mmcore.models.towers import TextConfig
from mmcore.serving import read_index
from mmcore.tracking import TrackingConfig, load, log_model, start_run
from pipelines.api import config_from
from pipelines.local import free_port
from pipelines.serve import CONFIG

pytestmark = pytest.mark.integration
NAME = "serve-test"
CHROMIUM = "/usr/bin/chromium"


class Served:
    def __init__(self, workdir: Path, dashboard: str, port: int, shards: Path) -> None:
        self.workdir, self.dashboard, self.shards = workdir, dashboard, shards
        self.url = f"http://127.0.0.1:{port}"
        self.config = yaml.safe_load(CONFIG.read_text())
        app = self.config["applications"][0]
        self.config["http_options"]["port"] = port
        app["runtime_env"]["env_vars"]["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
        app["args"]["index"] = str(shards)
        app["args"]["replicas"] |= {"max_replicas": 1, "num_cpus": 1.0}
        app["deployments"][0]["user_config"]["uri"] = f"models:/{NAME}@champion"

    def deploy(self) -> None:
        path = self.workdir / "serve.yaml"
        path.write_text(yaml.safe_dump(self.config))
        cmd = [str(Path(sys.executable).with_name("serve")), "deploy", str(path),
               "-a", self.dashboard]  # fmt: skip
        env = os.environ | {"RAY_AUTH_MODE": "token"}  # Ray 2.60's CLI sends the cluster token
        subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=60)

    def post(self, path: str, timeout: float = 30, **kwargs) -> requests.Response:
        return requests.post(self.url + path, timeout=timeout, **kwargs)

    def get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, timeout=30)


def late_model(seed: int, fusion: str = "late"):
    torch.manual_seed(seed)
    return build_model(ModelConfig(fusion=fusion, text=TextConfig(kind="transformer")))


@pytest.fixture(scope="module")
def served(ray_cluster, shards, mlflow_server, tmp_path_factory):
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server.url
    workdir = tmp_path_factory.mktemp("serve")
    # Version 1: a late-fusion model, the champion. Version 2: a hybrid (ITM) model.
    for version, (seed, fusion) in enumerate([(0, "late"), (1, "hybrid")], start=1):
        export = save_model(late_model(seed, fusion), workdir / f"model{version}")
        with start_run(TrackingConfig(experiment="test-serve")) as run:
            run.log_metrics({"eval/retrieval/i2t_r5": 0.1 * version}, step=1)
            log_model(export, registered_name=NAME)
    mlflow.MlflowClient(mlflow_server.url).set_registered_model_alias(NAME, "champion", "1")

    served = Served(workdir, ray_cluster.dashboard, free_port(), shards)
    served.deploy()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if requests.get(served.url + "/healthz", timeout=5).ok:
                break
        except requests.RequestException:  # not listening yet, or the app is still starting
            pass
        time.sleep(1)
    else:
        raise RuntimeError("the Serve app did not become healthy in 180 s")
    try:
        yield served
    finally:
        from ray import serve

        serve.shutdown()  # the session's Ray stays up for the next modules
        os.environ.pop("MLFLOW_TRACKING_URI")


def png_bytes(colour=(220, 30, 30), size=(80, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_health_model_info_docs_and_loopback_only(served) -> None:
    assert served.get("/healthz").json()["status"] == "ok"
    info = served.get("/v1/model").json()
    assert (info["name"], info["version"], info["alias"]) == (NAME, "1", "champion")
    assert info["fusion"] == "late" and info["metrics"] == {"eval/retrieval/i2t_r5": 0.1}
    assert info["index_size"] > 100 and info["embed_dim"] == 128
    paths = served.get("/openapi.json").json()["paths"]
    assert {"/healthz", "/v1/model", "/v1/embed", "/v1/classify", "/v1/search", "/v1/match"} <= set(
        paths
    )
    assert "multipart/form-data" in paths["/v1/classify"]["post"]["requestBody"]["content"]
    assert "swagger" in served.get("/docs").text.lower()
    port = int(served.url.rsplit(":", 1)[1])
    listening = {
        c.laddr.ip for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port
        and c.status == psutil.CONN_LISTEN
    }  # fmt: skip
    assert listening == {"127.0.0.1"}


def test_endpoints_give_what_the_model_gives(served, tmp_path) -> None:
    engine = Engine(load(f"models:/{NAME}/1"))
    red = Image.open(io.BytesIO(png_bytes())).convert("RGB")
    texts = ["a red circle", "a small blue star"]

    out = served.post("/v1/embed", json={"texts": texts, "images": [b64(png_bytes())]}).json()
    np.testing.assert_allclose(out["text_embeddings"], engine.embed_texts(texts), atol=1e-5)
    np.testing.assert_allclose(out["image_embeddings"], engine.embed_images([red]), atol=1e-5)
    assert out["dim"] == 128

    labels = ["red", "green", "blue"]
    got = served.post("/v1/classify", json={"image": b64(png_bytes()), "labels": labels}).json()
    probs = [p["probability"] for p in got["labels"]]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-5
    templates = config_from(CONFIG, [])[0].templates
    expected = dict(zip(labels, engine.classify([red], labels, templates)[0], strict=True))
    served_probs = {p["label"]: p["probability"] for p in got["labels"]}
    assert served_probs == pytest.approx(expected, abs=1e-5)

    got = served.post("/v1/match", json={"image": b64(png_bytes()), "texts": texts}).json()
    assert got["score"] == "cosine"
    np.testing.assert_allclose(got["scores"], engine.match(red, texts)[0], atol=1e-5)

    records = read_index(served.shards)
    query = records.images[7]
    buf = io.BytesIO()
    query.save(buf, "PNG")
    hits = served.post("/v1/search", json={"image": b64(buf.getvalue()), "k": 3}).json()["hits"]
    assert hits[0]["key"] == records.keys[7] and hits[0]["caption"] == records.captions[7]
    assert hits[0]["thumbnail"].startswith("data:image/jpeg;base64,") and len(hits) == 3
    hits = served.post("/v1/search", json={"text": "a red circle", "k": 5}).json()["hits"]
    assert len(hits) == 5 and [h["score"] for h in hits] == sorted(
        (h["score"] for h in hits), reverse=True
    )


def test_multipart_answers_equal_the_json_answers(served) -> None:
    blue = png_bytes((0, 0, 255))
    files = [
        ("images", ("a.png", png_bytes(), "image/png")),
        ("images", ("b.png", blue, "image/png")),
    ]
    texts = ["one", "two", "three"]
    out = served.post("/v1/embed", files=files, data={"texts": texts}).json()
    ref = served.post("/v1/embed", json={"images": [b64(png_bytes()), b64(blue)], "texts": texts})
    np.testing.assert_allclose(out["image_embeddings"], ref.json()["image_embeddings"], atol=1e-6)
    np.testing.assert_allclose(out["text_embeddings"], ref.json()["text_embeddings"], atol=1e-6)
    form = {"labels": ["red", "blue"], "templates": ["a {} shape."]}
    got = served.post(
        "/v1/classify", files={"image": ("a.png", png_bytes(), "image/png")}, data=form
    )
    ref = served.post("/v1/classify", json={"image": b64(png_bytes())} | form)
    assert _same_labels(got.json(), ref.json())
    got = served.post("/v1/search", files={"image": ("a.png", png_bytes(), "image/png")},
                      data={"k": "2"}).json()  # fmt: skip
    ref = served.post("/v1/search", json={"image": b64(png_bytes()), "k": 2}).json()
    assert [h["key"] for h in got["hits"]] == [h["key"] for h in ref["hits"]] and len(
        ref["hits"]
    ) == 2


def _same_labels(a: dict, b: dict) -> bool:
    prob = lambda d: {p["label"]: p["probability"] for p in d["labels"]}  # noqa: E731
    return prob(a) == pytest.approx(prob(b), abs=1e-6)


def test_dynamic_batching_batches_concurrent_requests(served) -> None:
    before = served.get("/v1/model").json()["batch_sizes"]
    texts = [f"a red circle number {i}" for i in range(48)]
    with ThreadPoolExecutor(max_workers=24) as pool:
        answers = list(pool.map(lambda t: served.post("/v1/embed", json={"texts": [t]}), texts))
    assert all(a.ok for a in answers)
    after = served.get("/v1/model").json()["batch_sizes"]
    grew = {int(k): n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}
    assert sum(k * n for k, n in grew.items()) == 48  # every text went through one batch
    assert max(grew) > 1, grew  # and some batches held more than one request's text


BOMB = io.BytesIO()
Image.new("L", (6000, 4000)).save(BOMB, "PNG")  # 24 MP of zeros in ~25 kB
JSON = {"Content-Type": "application/json"}
BAD = [
    ("invalid JSON", "/v1/embed", {"data": b'{"texts": [', "headers": JSON}, 400),
    ("not an object", "/v1/embed", {"json": ["a red circle"]}, 400),
    ("invalid base64", "/v1/embed", {"json": {"images": ["@@not base64@@"]}}, 400),
    (
        "not an image",
        "/v1/classify",
        {"json": {"image": b64(b"GIF89a, or is it"), "labels": ["a"]}},
        400,
    ),  # fmt: skip
    ("bomb header", "/v1/embed", {"json": {"images": [b64(_png_header_only(30000, 30000))]}}, 413),
    ("bomb", "/v1/match", {"json": {"image": b64(BOMB.getvalue()), "texts": ["x"]}}, 413),
    ("over the size limit", "/v1/embed", {"data": b" " * (9 << 20), "headers": JSON}, 413),
    ("too many texts", "/v1/embed", {"json": {"texts": ["x"] * 257}}, 413),
    (
        "too many labels",
        "/v1/classify",
        {"json": {"image": b64(png_bytes()), "labels": [str(i) for i in range(257)]}},
        413,
    ),
    ("empty labels", "/v1/classify", {"json": {"image": b64(png_bytes()), "labels": []}}, 422),
    (
        "template without {}",
        "/v1/classify",
        {"json": {"image": b64(png_bytes()), "labels": ["a"], "templates": ["a photo"]}},
        422,
    ),
    ("wrong type", "/v1/embed", {"json": {"texts": "a red circle"}}, 422),
    ("caption from a late model", "/v1/caption", {"json": {"image": b64(png_bytes())}}, 422),
    (
        "answer from a late model",
        "/v1/vqa",
        {"json": {"image": b64(png_bytes()), "question": "what colour?"}},
        422,
    ),
    ("question missing", "/v1/vqa", {"json": {"image": b64(png_bytes())}}, 422),
    ("wrong item type", "/v1/match", {"json": {"image": b64(png_bytes()), "texts": [1, 2]}}, 422),
    ("unknown field", "/v1/embed", {"json": {"text": ["a"]}}, 422),
    ("nothing to embed", "/v1/embed", {"json": {}}, 422),
    ("too many images", "/v1/embed", {"json": {"images": [b64(png_bytes())] * 17}}, 413),
    ("neither query", "/v1/search", {"json": {"k": 3}}, 422),
    (
        "duplicate labels",
        "/v1/classify",
        {"json": {"image": b64(png_bytes()), "labels": ["a", "a"]}},
        422,
    ),
    (
        "over-size multipart body",
        "/v1/embed",
        {"files": {"images": ("big.png", b"\0" * (9 << 20), "image/png")}},
        413,
    ),  # fmt: skip
    ("both queries", "/v1/search", {"json": {"text": "a", "image": b64(png_bytes())}}, 422),
    ("k out of range", "/v1/search", {"json": {"text": "a", "k": 0}}, 422),
    ("overlong text", "/v1/embed", {"json": {"texts": ["a" * 2001]}}, 400),
    (
        "wrong content type",
        "/v1/embed",
        {"data": b"texts=a", "headers": {"Content-Type": "text/plain"}},
        415,
    ),  # fmt: skip
    (
        "broken multipart",
        "/v1/embed",
        {"data": b"--x\r\nbroken", "headers": {"Content-Type": "multipart/form-data; boundary=x"}},
        422,
    ),  # fmt: skip
]


@pytest.mark.parametrize(("case", "path", "kwargs", "status"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_with_a_message(served, case, path, kwargs, status) -> None:
    res = served.post(path, **kwargs)
    assert res.status_code == status, res.text
    assert res.json()["error"]
    assert served.get("/healthz").ok  # and the server goes on


def test_page_in_headless_chromium(served, tmp_path) -> None:
    from playwright.sync_api import sync_playwright

    image = tmp_path / "red.png"
    image.write_bytes(png_bytes())
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update",
             "--disable-sync"]  # fmt: skip
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=flags)
        page = browser.new_page(viewport={"width": 1000, "height": 1100})
        page.goto(served.url + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('late')")
        page.set_input_files("#file", str(image))
        page.fill("#labels", "red, green, blue")
        page.click("#classify")
        page.wait_for_selector("#probs .bar")
        assert page.locator("#probs .bar").count() == 3
        shares = [float(t.rstrip("%")) for t in page.locator("#probs .bar span:last-child")
                  .all_text_contents()]  # fmt: skip
        assert abs(sum(shares) - 100) < 0.5 and shares == sorted(shares, reverse=True)

        # Dropping a file works like choosing one.
        page.evaluate_handle(
            """(data) => {
                const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
                const dt = new DataTransfer();
                dt.items.add(new File([bytes], "blue.png", {type: "image/png"}));
                document.getElementById("drop").dispatchEvent(
                    new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
            }""",
            b64(png_bytes((30, 30, 230))),
        )  # fmt: skip
        page.wait_for_function("document.getElementById('preview').src.startsWith('data:')")

        page.fill("#query", "a red circle")
        page.press("#query", "Enter")
        page.wait_for_selector("#hits .hit img")
        assert page.locator("#hits .hit").count() == 12
        natural = "[...document.querySelectorAll('#hits img')].map(i => i.naturalWidth)"
        assert min(page.evaluate(natural)) > 0  # every thumbnail decoded

        assert "does not caption" in page.locator("#caption-out").text_content()
        assert page.locator("#caption").is_disabled()  # the late champion cannot caption
        assert "does not answer" in page.locator("#answer-out").text_content()
        assert page.locator("#ask").is_disabled()

        page.fill("#labels", "")  # no labels: the API's message is shown, not a crash
        page.click("#classify")
        page.wait_for_selector("#probs .error")
        assert "labels" in page.locator("#probs .error").text_content()
        shot = Path(os.environ.get("MMRAY_SCREENSHOT", tmp_path / "page.png"))
        page.fill("#labels", "red, green, blue")
        page.click("#classify")
        page.wait_for_selector("#probs .bar")
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert Image.open(shot).size[0] == 1000


def test_switching_the_champion_under_load_loses_no_request(served) -> None:
    before = served.get("/v1/model").json()
    mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).set_registered_model_alias(
        NAME, "champion", "2"
    )
    stop, codes = threading.Event(), Counter()
    requests_ = [
        ("/v1/embed", {"texts": ["a red circle"], "images": [b64(png_bytes())]}),
        ("/v1/classify", {"image": b64(png_bytes()), "labels": ["red", "blue"]}),
        ("/v1/match", {"image": b64(png_bytes()), "texts": ["a red circle"]}),
    ]

    def client(i: int) -> None:
        while not stop.is_set():
            path, body = requests_[i % len(requests_)]
            try:
                codes[served.post(path, json=body, timeout=60).status_code] += 1
            except requests.RequestException as e:
                codes[type(e).__name__] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(2)
    served.config["applications"][0]["deployments"][0]["user_config"]["revision"] = 1
    served.deploy()  # the alias moved: bump the revision, `serve deploy` again
    deadline = time.monotonic() + 120
    while served.get("/v1/model").json()["version"] != "2" and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(2)  # keep the load on the new model for a moment
    stop.set()
    for t in threads:
        t.join()
    after = served.get("/v1/model").json()
    assert (after["version"], after["fusion"], after["revision"]) == ("2", "hybrid", 1)
    assert after["replica"] == before["replica"]  # reconfigured in place, not replaced
    assert set(codes) == {200} and codes[200] > 20, codes
    got = served.post("/v1/match", json={"image": b64(png_bytes()), "texts": ["a"]}).json()
    assert got["score"] == "itm" and 0 < got["scores"][0] < 1


def test_captions_and_answers_after_the_switch_equal_the_engines(served, tmp_path) -> None:
    """After the switch above, the champion is version 2, a hybrid: it has a decoder."""
    from playwright.sync_api import sync_playwright

    from mmcore.tasks import GenerationConfig

    engine = Engine(load(f"models:/{NAME}/2"))
    colours = [(220, 30, 30), (30, 30, 230), (30, 200, 30), (240, 220, 40)]
    images = [Image.open(io.BytesIO(png_bytes(c))).convert("RGB") for c in colours]
    for beams in (1, 3):
        want = engine.caption(images, GenerationConfig(num_beams=beams, max_new_tokens=8))
        bodies = [{"image": b64(png_bytes(c)), "num_beams": beams, "max_new_tokens": 8}
                  for c in colours]  # fmt: skip
        with ThreadPoolExecutor(4) as pool:  # concurrent: batched on the server
            got = list(pool.map(lambda body: served.post("/v1/caption", json=body).json(), bodies))
        assert [g["caption"] for g in got] == [t for t, _ in want]
        assert [g["score"] for g in got] == pytest.approx([s for _, s in want], abs=1e-4)
    nbest = GenerationConfig(num_beams=3, num_return_sequences=3, max_new_tokens=8)
    want = engine.caption(images[:1], nbest)
    body = {"image": b64(png_bytes(colours[0])), "num_beams": 3, "num_return_sequences": 3,
            "max_new_tokens": 8}  # fmt: skip
    got = served.post("/v1/caption", json=body)
    captions = got.json()["captions"]
    assert [c["caption"] for c in captions] == [t for t, _ in want]  # the best three, best first
    assert [c["score"] for c in captions] == pytest.approx([s for _, s in want], abs=1e-4)
    assert got.json()["caption"] == captions[0]["caption"]
    sampled = {"image": b64(png_bytes()), "top_p": 0.9, "seed": 3, "max_new_tokens": 8}
    assert served.post("/v1/caption", json=sampled).json() == served.post(
        "/v1/caption", json=sampled).json()  # fmt: skip
    for bad in ({"num_beams": 6}, {"max_new_tokens": 31}, {"num_beams": 2, "top_p": 0.5},
                {"temperature": 0}, {"top_p": 1.5}, {"num_return_sequences": 2}):  # fmt: skip
        res = served.post("/v1/caption", json={"image": b64(png_bytes())} | bad)
        assert res.status_code == 422 and res.json()["error"], (bad, res.text)

    # Answers, to questions of different lengths, concurrent: batched on the server
    questions = ["what colour is the circle?", "how many shapes are there?", "where is it?",
                 "what shape is the red object?"]  # fmt: skip
    want = engine.answer(images, questions)
    bodies = [{"image": b64(png_bytes(c)), "question": q}
              for c, q in zip(colours, questions, strict=True)]  # fmt: skip
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda body: served.post("/v1/vqa", json=body).json(), bodies))
    assert [g["answer"] for g in got] == [t for t, _ in want]
    assert [g["score"] for g in got] == pytest.approx([s for _, s in want], abs=1e-4)
    for bad in ({"question": " "}, {"question": "what " * 40}, {"question": "a?", "num_beams": 6},
                {"question": "a?", "top_p": 0.5}):  # fmt: skip
        res = served.post("/v1/vqa", json={"image": b64(png_bytes())} | bad)
        assert res.status_code == 422 and res.json()["error"], (bad, res.text)
    info = served.get("/v1/model").json()
    assert info["captions"] and info["answers"]

    image = tmp_path / "red.png"
    image.write_bytes(png_bytes())
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox"])
        page = browser.new_page()
        page.goto(served.url + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('hybrid')")
        page.set_input_files("#file", str(image))
        page.wait_for_function("document.getElementById('preview').src.startsWith('data:')")
        page.click("#caption")
        page.wait_for_selector("#caption-out .caption")
        text = page.locator("#caption-out .caption").text_content()
        page.fill("#question", questions[0])
        page.press("#question", "Enter")
        page.wait_for_selector("#answer-out .answer")
        answered = page.locator("#answer-out .answer").text_content()
        browser.close()
    for shown, (want_text, want_score) in (
        (text, engine.caption(images[:1])[0]),
        (answered, engine.answer(images[:1], questions[:1])[0]),
    ):
        assert shown.startswith(f"{want_text} (")
        assert float(shown[len(want_text) + 2 : -1]) == pytest.approx(want_score, abs=1e-3)
