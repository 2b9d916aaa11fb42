"""Generation from the image-grounded decoder (mmcore.generate)."""

from __future__ import annotations

import json

import pytest
import torch
import webdataset as wds
from PIL import Image

from mmcore.data.inputs import token_ids
from mmcore.eval.caption import caption_metrics
from mmcore.eval.run import eval_metrics, read_shards
from mmcore.export import load_model, save_model
from mmcore.generate import GenerationConfig, generate
from mmcore.inference import Engine
from mmcore.losses.fusion import caption_loss
from mmcore.models.model import ModelConfig, build_model
from mmcore.models.towers import TextConfig, VisionConfig
from pipelines import evaluate


def _model(fusion: str = "cross_attention", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(fusion=fusion, text=TextConfig(kind="transformer"),
                      vision=VisionConfig(image_size=32))  # fmt: skip
    return build_model(cfg).eval()


def test_greedy_equals_one_beam_and_sampling_repeats_with_its_seed() -> None:
    model, pixels = _model("hybrid"), torch.randn(3, 3, 32, 32)
    greedy = generate(model, pixels, GenerationConfig(max_new_tokens=8))
    assert greedy == generate(model, pixels, GenerationConfig(max_new_tokens=8, num_beams=1))
    beams = generate(model, pixels, GenerationConfig(max_new_tokens=8, num_beams=3))
    assert all(b[1] >= g[1] - 1e-6 for b, g in zip(beams, greedy, strict=True))  # beams search more
    sampled = GenerationConfig(max_new_tokens=8, top_p=0.9, seed=7)
    assert generate(model, pixels, sampled) == generate(model, pixels, sampled)
    assert len(greedy) == 3 and all(isinstance(t, str) for t, _ in greedy)


def test_the_decoder_never_sees_a_later_token() -> None:
    """What generation without a cache relies on: the logits at position t are the same
    whatever follows t."""
    model = _model()
    image = model.vision(torch.randn(2, 3, 32, 32))[0]
    ids = torch.randint(1000, 2000, (2, 10))
    full = model.caption_logits(image, ids, torch.ones_like(ids))
    for t in (1, 4, 9):
        prefix = model.caption_logits(image, ids[:, :t], torch.ones_like(ids[:, :t]))
        torch.testing.assert_close(prefix, full[:, :t], atol=1e-5, rtol=1e-5)


CAPTIONS = ["a large red circle", "a small blue square", "a green triangle above a cross"]
COLOURS = [(220, 40, 40), (40, 80, 220), (40, 170, 60)]


@pytest.fixture(scope="module")
def overfit() -> tuple[torch.nn.Module, list[Image.Image]]:
    """A decoder trained on three (image, caption) pairs until it knows them by heart."""
    model = _model().train()
    images = [Image.new("RGB", (48, 40), c) for c in COLOURS]
    pixels = Engine(model).transforms.pixels(images)
    ids, mask = (torch.from_numpy(a) for a in token_ids(CAPTIONS, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(150):
        loss = caption_loss(model, model(pixels, ids, mask), ids, mask)["caption"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), images


def test_a_model_overfit_on_a_few_pairs_regenerates_their_captions(overfit) -> None:
    model, images = overfit
    pixels = Engine(model).transforms.pixels(images)
    for cfg in (GenerationConfig(), GenerationConfig(num_beams=3)):
        assert [t for t, _ in generate(model, pixels, cfg)] == CAPTIONS


def test_eval_caption_gives_the_direct_computations_numbers(overfit, tmp_path, capsys) -> None:
    model, images = overfit
    folder = save_model(model, tmp_path / "model")
    with wds.TarWriter(str(tmp_path / "00000.tar")) as sink:
        for i, (image, caption) in enumerate(zip(images, CAPTIONS, strict=True)):
            sink.write({"__key__": f"{i:09d}", "jpg": image, "txt": caption})
    args = ["caption", "--model", str(folder), "--data", str(tmp_path)]
    assert evaluate.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    _, decoded, captions = read_shards(tmp_path)  # the images as JPEG made them
    generated = [t for t, _ in Engine(load_model(folder)).caption(decoded)]
    assert {k: out[k] for k in ("bleu4", "cider")} == caption_metrics(captions, generated)
    assert out["n_images"] == 3 and out["bleu4"] > 0.9
    assert out["examples"][0] == {"reference": CAPTIONS[0], "generated": generated[0]}

    # The training job's evaluation logs the same numbers for its validation pairs
    ids, _ = token_ids(CAPTIONS, 32)
    val = (Engine(model).transforms.pixels(decoded), torch.from_numpy(ids), None)
    metrics = eval_metrics(model, [], val[:2] + (torch.ones_like(val[1]),), captions=True)
    assert metrics["caption/bleu4"] == out["bleu4"] and metrics["caption/cider"] == out["cider"]

    late = save_model(_model("late"), tmp_path / "late")
    assert evaluate.main(["caption", "--model", str(late), "--data", str(tmp_path)]) == 2
    assert "(fusion=late) has no caption decoder" in capsys.readouterr().err
    assert evaluate.main([*args, "--max-new-tokens", "99"]) == 2


@pytest.mark.parametrize(
    "fusion, kwargs, message",
    [
        ("late", {}, "has no decoder"),
        ("hybrid", {"max_new_tokens": 40}, "max_new_tokens must be in"),
        ("hybrid", {"num_beams": 2, "top_p": 0.5}, "not both"),
        ("hybrid", {"top_p": 0.0}, "top_p must be in"),
    ],
)
def test_bad_settings_are_refused(fusion: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate(_model(fusion), torch.randn(1, 3, 32, 32), GenerationConfig(**kwargs))
