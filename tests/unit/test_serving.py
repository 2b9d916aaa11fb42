"""The serving core without Ray: image decoding and its refusals, the engine's operations."""

from __future__ import annotations

import base64
import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mmcore.config import ConfigError, from_dict
from mmcore.data.sample import _png_header_only
from mmcore.eval.zeroshot import DEFAULT_TEMPLATES
from mmcore.inference import Engine
from mmcore.models.model import ModelConfig, build_model
from mmcore.models.towers import TextConfig
from mmcore.serving import BadInput, Limits, decode_image, preview
from pipelines.api import ServeConfig, config_from
from pipelines.serve import CONFIG

LIMITS = Limits()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def images(n: int = 6) -> list[Image.Image]:
    colours = [(220, 30, 30), (30, 200, 40), (40, 40, 220), (230, 220, 30), (150, 40, 160)]
    return [Image.new("RGB", (70 + 3 * i, 64), colours[i % len(colours)]) for i in range(n)]


@pytest.fixture(scope="module")
def late() -> Engine:
    torch.manual_seed(0)
    return Engine(build_model(ModelConfig(text=TextConfig(kind="transformer"))))


@pytest.fixture(scope="module")
def hybrid() -> Engine:
    torch.manual_seed(0)
    return Engine(build_model(ModelConfig(fusion="hybrid", text=TextConfig(kind="transformer"))))


def test_decode_accepts_base64_data_urls_and_raw_bytes() -> None:
    data = png(Image.new("RGBA", (40, 30), (10, 20, 30, 128)))
    b64 = base64.b64encode(data).decode()
    for value in (data, b64, "data:image/png;base64," + b64):
        img = decode_image(value, LIMITS)
        assert img.mode == "RGB" and img.size == (40, 30)


@pytest.mark.parametrize(
    ("value", "status", "words"),
    [
        ("not base64!!", 400, "base64"),
        (base64.b64encode(b"hello, not an image").decode(), 400, "not an image"),
        (png(Image.new("RGB", (40, 30)))[:60], 400, "image"),  # truncated
        (_png_header_only(30_000, 30_000), 413, "image_too_large"),  # a bomb's header
        (png(Image.new("L", (5000, 4000))), 413, "image_too_large"),  # 20 MP of zeros, 20 kB
    ],
)
def test_decode_refuses_bad_images_with_a_4xx(value, status: int, words: str) -> None:
    with pytest.raises(BadInput, match=words) as e:
        decode_image(value, LIMITS)
    assert e.value.status == status


def test_embeddings_are_unit_norm_and_match_the_model(late: Engine) -> None:
    texts = ["a red circle", "a large blue star on a grey background"]
    emb = late.embed_texts(texts)
    assert emb.shape == (2, 128) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    # Padding is trimmed per batch: a text embeds the same alone or beside a longer one.
    np.testing.assert_allclose(late.embed_texts(texts[:1])[0], emb[0], atol=1e-5)
    img = late.embed_images(images(3))
    assert img.shape == (3, 128) and np.allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)


def test_classify_is_a_distribution_and_equals_the_embedding_path(late: Engine) -> None:
    labels = ["red", "green", "blue"]
    probs = late.classify(images(2), labels, DEFAULT_TEMPLATES)
    assert probs.shape == (2, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    prompts = [t.format(label) for label in labels for t in DEFAULT_TEMPLATES]
    split = late.probs_from_embeddings(
        late.embed_images(images(2)), late.embed_texts(prompts), len(labels)
    )
    np.testing.assert_allclose(split, probs, atol=1e-5)


def test_match_and_search(late: Engine, hybrid: Engine) -> None:
    pics = images(6)
    scores, kind = late.match(pics[0], ["a red square", "a blue star"])
    assert kind == "cosine"
    np.testing.assert_allclose(
        scores, late.embed_texts(["a red square", "a blue star"]) @ late.embed_images(pics[:1])[0],
        atol=1e-5,
    )  # fmt: skip
    for engine in (late, hybrid):
        index = engine.index(pics)
        hits, kind = engine.search(index, k=3, image=pics[4])
        assert hits[0][0] == 4 and kind == "cosine" and len(hits) == 3  # itself first
        hits, kind = engine.search(index, k=6, text="a red square")
        assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
        assert kind == ("cosine" if engine is late else "itm") and len(hits) == 6
    itm, kind = hybrid.match(pics[0], ["a red square", "a blue star"])
    assert kind == "itm" and ((itm > 0) & (itm < 1)).all()
    probs = hybrid.classify(pics[:2], ["red", "blue"], ["a {}."])
    assert np.allclose(probs.sum(1), 1, atol=1e-5)


def test_onnx_int8_backend_agrees_with_torch(late: Engine) -> None:
    onnx = Engine(late.model, backend="onnx-int8")
    cos = (onnx.embed_texts(["a red circle"]) * late.embed_texts(["a red circle"])).sum()
    assert cos > 0.98
    cos = (onnx.embed_images(images(1)) * late.embed_images(images(1))).sum()
    assert cos > 0.98
    with pytest.raises(ValueError, match="fusion=late"):
        Engine(build_model(ModelConfig(fusion="hybrid", text=TextConfig(kind="transformer"))),
               backend="onnx")  # fmt: skip


def test_the_server_driver_starts_without_the_model_code() -> None:
    """`mmray serve` (and `serve run`) builds the application without torch, transformers or
    the model code, which only the replicas load: its start and its config errors come
    seconds sooner."""
    code = (
        "import sys; from pipelines import api, serve\n"
        "a = serve.parse_args(['--model', 'nowhere'])\n"
        "cfg, _ = api.config_from(a.config, a.overrides, a.values)\n"
        "try: serve.check(cfg)\n"
        "except Exception as e: print(e)\n"
        "print(sorted({'torch', 'transformers', 'mmcore.inference'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    refused, loaded = out.stdout.strip().splitlines()
    assert "model nowhere: " in refused and loaded == "[]"


def test_preview_is_a_small_jpeg_data_url() -> None:
    url = preview(Image.new("RGB", (400, 200), "red"))
    small = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert url.startswith("data:image/jpeg;base64,") and small.size == (96, 48)


def test_serve_config_is_checked_before_any_work() -> None:
    cfg, http = config_from(CONFIG, [])
    assert http["host"] == "127.0.0.1" and cfg.model.uri.endswith("@champion")
    assert cfg == ServeConfig()  # serve.yaml and the dataclasses tell the same defaults
    assert cfg.replicas.max_ongoing_requests >= cfg.model.max_batch_size
    with pytest.raises(ConfigError, match="batches could never fill"):
        from_dict(ServeConfig, {"model": {"max_batch_size": 64},
                                "replicas": {"max_ongoing_requests": 8}})  # fmt: skip
    with pytest.raises(ConfigError, match="backend"):
        config_from(CONFIG, ["model.backend=tensorrt"])
    with pytest.raises(ConfigError, match="templates"):
        from_dict(ServeConfig, {"templates": ["no placeholder"]})
