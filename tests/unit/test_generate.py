"""Generation from the image-grounded decoder (mmcore.generate)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import webdataset as wds
from PIL import Image

from mmcore.data.inputs import token_ids
from mmcore.data.shards import read_shards
from mmcore.eval.caption import caption_metrics
from mmcore.eval.run import eval_metrics, read_questions
from mmcore.eval.vqa import vqa_metrics
from mmcore.export import load_model, save_model
from mmcore.generate import generate, generate_chunks
from mmcore.inference import Engine
from mmcore.losses.fusion import caption_loss, vqa_loss
from mmcore.models.model import ModelConfig, build_model
from mmcore.models.towers import TextConfig, VisionConfig
from mmcore.tasks import ANSWER, GenerationConfig
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
# Questions of three lengths, answers of one and two words; each image has two.
QA = [
    [("what colour is it?", "red", "colour"), ("how many shapes are there?", "one", "count")],
    [("what colour is it?", "blue", "colour"), ("what shape is the blue object?", "square",
                                                 "shape")],
    [("what colour is it?", "dark green", "colour"), ("how many shapes are there?", "two",
                                                      "count")],
]  # fmt: skip


@pytest.fixture(scope="module")
def overfit() -> tuple[torch.nn.Module, list[Image.Image]]:
    """A decoder trained on three (image, caption) pairs and their questions until it knows
    them by heart."""
    model = _model().train()
    images = [Image.new("RGB", (48, 40), c) for c in COLOURS]
    pixels = Engine(model).transforms.pixels(images)
    ids, mask = (torch.from_numpy(a) for a in token_ids(CAPTIONS, 32))
    qa = [[torch.from_numpy(a) for a in token_ids([rows[i][:2] for rows in QA], 32)]
          for i in (0, 1)]  # each image's first questions, then its second  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(200):
        out = model(pixels, ids, mask)
        loss = (caption_loss(model, out, ids, mask)["caption"]
                + vqa_loss(model, out, *qa[step % 2])["vqa"])  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.objectives = frozenset({"caption", "vqa"})
    return model.eval(), images


def test_a_model_overfit_on_a_few_pairs_regenerates_their_captions(overfit) -> None:
    model, images = overfit
    pixels = Engine(model).transforms.pixels(images)
    for cfg in (GenerationConfig(), GenerationConfig(num_beams=3)):
        assert [t for t, _ in generate(model, pixels, cfg)] == CAPTIONS


def test_it_answers_its_questions_batched_as_one_by_one(overfit) -> None:
    model, images = overfit
    engine = Engine(model)
    asked = [(image, q, a) for image, rows in zip(images, QA, strict=True) for q, a, _ in rows]
    questions = [q for _, q, _ in asked]
    for cfg in (ANSWER, GenerationConfig(num_beams=3, max_new_tokens=5)):
        batched = engine.answer([i for i, _, _ in asked], questions, cfg)
        assert [t for t, _ in batched] == [a for _, _, a in asked]
        alone = [engine.answer([i], [q], cfg)[0] for i, q, _ in asked]
        assert [t for t, _ in alone] == [t for t, _ in batched]
        for (_, x), (_, y) in zip(alone, batched, strict=True):
            assert x == pytest.approx(y, abs=1e-5)
    greedy = engine.answer(images, ["what colour is it?"] * 3)
    assert greedy == engine.answer(images, ["what colour is it?"] * 3, dataclasses.replace(
        ANSWER, num_beams=1))  # fmt: skip


def _write_shard(folder, images) -> None:
    with wds.TarWriter(str(folder / "00000.tar")) as sink:
        for i, (image, caption, rows) in enumerate(zip(images, CAPTIONS, QA, strict=True)):
            qa = [{"question": q, "answer": a, "type": t} for q, a, t in rows]
            sink.write({"__key__": f"{i:09d}", "jpg": image, "txt": caption,
                        "json": {"qa": qa}})  # fmt: skip


def test_eval_caption_gives_the_direct_computations_numbers(overfit, tmp_path, capsys) -> None:
    model, images = overfit
    folder = save_model(model, tmp_path / "model")
    _write_shard(tmp_path, images)
    args = ["caption", "--model", str(folder), "--data", str(tmp_path)]
    assert evaluate.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    _, decoded, captions = read_shards(tmp_path)  # the images as JPEG made them
    generated = [t for t, _ in Engine(load_model(folder)).caption(decoded)]
    assert {k: out[k] for k in ("bleu4", "cider")} == caption_metrics(captions, generated)
    assert out["n_images"] == 3 and out["bleu4"] > 0.9
    assert out["examples"][0] == {"reference": CAPTIONS[0], "generated": generated[0]}

    # The training job's evaluation logs the same numbers for its validation pairs
    metrics = eval_metrics(model, [], _val(decoded), generative=True)
    assert metrics["caption/bleu4"] == out["bleu4"] and metrics["caption/cider"] == out["cider"]

    late = save_model(_model("late"), tmp_path / "late")
    assert evaluate.main(["caption", "--model", str(late), "--data", str(tmp_path)]) == 2
    assert "(fusion=late) has no decoder" in capsys.readouterr().err
    assert evaluate.main([*args, "--max-new-tokens", "99"]) == 2


def _val(images: list[Image.Image]) -> dict[str, torch.Tensor]:
    """A validation batch as training's evaluation gets it: each image's first question."""
    ids, mask = token_ids(CAPTIONS, 32)
    qa_ids, qa_mask = token_ids([rows[0][:2] for rows in QA], 32)
    return {"pixels": Engine(_model()).transforms.pixels(images),
            "input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "qa_ids": torch.from_numpy(qa_ids), "qa_mask": torch.from_numpy(qa_mask)}  # fmt: skip


def test_eval_vqa_gives_the_direct_computations_numbers(overfit, tmp_path, capsys) -> None:
    model, images = overfit
    folder = save_model(model, tmp_path / "model")
    _write_shard(tmp_path, images)
    assert evaluate.main(["vqa", "--model", str(folder), "--data", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    decoded, questions, answers, types = read_questions(tmp_path)
    predicted = [t for t, _ in Engine(load_model(folder)).answer(decoded, questions)]
    expected = vqa_metrics(answers, predicted, types)
    assert {k: out[k] for k in expected} == expected
    assert out["accuracy"] == 1.0 and out["n_questions"] == 6
    assert out["by_type"]["colour"] == {"accuracy": 1.0, "majority_baseline": 1 / 3,
                                        "n_questions": 3}  # fmt: skip
    assert out["examples"][0] == {"question": QA[0][0][0], "answer": "red", "predicted": "red"}

    metrics = eval_metrics(model, [], _val(read_shards(tmp_path)[1]), generative=True)
    assert metrics["vqa/accuracy"] == 1.0

    # A model whose decoder learnt captions only is refused, with the reason
    captions_only = _model()
    captions_only.objectives = frozenset({"clip", "caption"})
    folder = save_model(captions_only, tmp_path / "captions-only")
    assert evaluate.main(["vqa", "--model", str(folder), "--data", str(tmp_path)]) == 2
    assert "not trained with the vqa objective" in capsys.readouterr().err
    plain = tmp_path / "plain"
    plain.mkdir()
    with wds.TarWriter(str(plain / "00000.tar")) as sink:
        sink.write({"__key__": "000000000", "jpg": images[0], "txt": CAPTIONS[0]})
    assert evaluate.main(["vqa", "--model", str(tmp_path / "model"), "--data", str(plain)]) == 2
    assert "no sample has questions" in capsys.readouterr().err


def test_vqa_metrics_and_the_majority_baseline() -> None:
    out = vqa_metrics(["Red", "red", "blue", "one", "two"], ["red.", "blue", "blue", "one", "one"],
                      ["colour", "colour", "colour", "count", "count"])  # fmt: skip
    assert out["accuracy"] == 3 / 5 and out["majority_baseline"] == 3 / 5
    assert out["by_type"]["colour"] == {"accuracy": 2 / 3, "majority_baseline": 2 / 3,
                                        "n_questions": 3}  # fmt: skip
    assert out["by_type"]["count"]["majority_baseline"] == 1 / 2


def test_beam_search_returns_each_images_best_beams_best_first() -> None:
    model, pixels = _model("hybrid"), torch.randn(3, 3, 32, 32)
    best = generate(model, pixels, GenerationConfig(max_new_tokens=8, num_beams=4))
    cfg = GenerationConfig(max_new_tokens=8, num_beams=4, num_return_sequences=3)
    nbest = generate(model, pixels, cfg)
    assert len(nbest) == 9 and nbest[::3] == best  # image after image, its best first
    for i in range(3):
        mine = nbest[3 * i : 3 * i + 3]
        assert [s for _, s in mine] == sorted((s for _, s in mine), reverse=True)
        assert len({t for t, _ in mine}) == 3  # three different beams
    # In chunks (as the engine and the evaluation call it), with prompts: the same texts.
    prompts = [[101, 1037, 102], [101, 102], [101, 1037, 102]]
    whole = generate(model, pixels, cfg, prompts)
    chunked = generate_chunks(model, pixels.split(2), cfg, prompts)
    assert [t for t, _ in chunked] == [t for t, _ in whole]
    assert [s for _, s in chunked] == pytest.approx([s for _, s in whole], abs=1e-5)


@pytest.mark.parametrize(
    "fusion, kwargs, message",
    [
        ("late", {}, "has no decoder"),
        ("hybrid", {"max_new_tokens": 40}, "max_new_tokens must be in"),
        ("hybrid", {"num_beams": 2, "top_p": 0.5}, "not both"),
        ("hybrid", {"top_p": 0.0}, "top_p must be in"),
        ("hybrid", {"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences must"),
        ("hybrid", {"top_p": 0.5, "num_return_sequences": 2}, "num_return_sequences must"),
    ],
)
def test_bad_settings_are_refused(fusion: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate(_model(fusion), torch.randn(1, 3, 32, 32), GenerationConfig(**kwargs))
