"""Every fusion variant × every objective it supports, on the tiny size."""

from __future__ import annotations

import pytest
import torch

from mmcore.losses.fusion import (
    AnswerPrior,
    answer_targets,
    check_objectives,
    compute_losses,
    mask_tokens,
)
from mmcore.models.model import ModelConfig, build_model
from mmcore.models.towers import TextConfig, tokenize, tokenizer
from mmcore.models.variants import OBJECTIVES

CAPTIONS = ["a red circle", "a small blue square above a green cross", "a purple diamond",
            "a large yellow triangle to the left of a red square"]  # fmt: skip
VARIANTS = sorted(OBJECTIVES)
TRAINED = {  # the parts each term must reach, besides both towers
    "clip": ["visual_projection"], "siglip": ["logit_bias"], "itm": ["itm_head", "fusion"],
    "mlm": ["lm_head", "fusion"], "caption": ["lm_head", "positions"],
    "vqa": ["lm_head", "positions"],
}  # fmt: skip
QA = [("what colour is the circle?", "red"), "", ("how many shapes are there?", "two"),
      ("what shape is the purple object?", "diamond")]  # fmt: skip


def tiny(fusion: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(fusion=fusion, text=TextConfig(kind="transformer")))


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens = tokenize(CAPTIONS, 16)
    pixels = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return pixels, tokens["input_ids"], tokens["attention_mask"]


def batch() -> dict[str, torch.Tensor]:
    """A training batch: the pairs, and a question per row but the second."""
    pixels, ids, mask = inputs()
    qa = tokenize(QA, 16)
    return {"pixels": pixels, "input_ids": ids, "attention_mask": mask,
            "qa_ids": qa["input_ids"], "qa_mask": qa["attention_mask"]}  # fmt: skip


@pytest.mark.parametrize(
    ("fusion", "term"), [(f, t) for f in VARIANTS for t in sorted(OBJECTIVES[f])]
)
def test_forward_backward(fusion: str, term: str) -> None:
    model = tiny(fusion)
    weights = {term: 1.0} | (
        {"clip": 0.5} if fusion == "hybrid" and term not in ("clip", "siglip") else {}
    )
    total, terms = compute_losses(model, batch(), weights, torch.Generator().manual_seed(0))
    assert set(terms) == set(weights) and torch.isfinite(total)
    total.backward()
    trained = TRAINED[term]
    for name in trained + ["vision", "text"]:
        part = getattr(model, name)
        params = [part] if isinstance(part, torch.nn.Parameter) else list(part.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), (
            fusion,
            term,
            name,
        )


def test_unsupported_objectives_are_refused_with_the_alternatives() -> None:
    with pytest.raises(ValueError, match=r"'late' does not support loss term\(s\) \['itm'\]"):
        check_objectives("late", {"clip": 1.0, "itm": 1.0})
    with pytest.raises(ValueError, match=r"'film'.*\['mlm'\]; it supports \['itm'\]"):
        check_objectives("film", {"mlm": 1.0})
    with pytest.raises(ValueError, match="hybrid' contrasts first"):
        check_objectives("hybrid", {"itm": 1.0})


def test_mask_tokens_targets_only_real_words() -> None:
    _, ids, mask = inputs()
    masked, labels = mask_tokens(ids, mask, prob=0.5, generator=torch.Generator().manual_seed(0))
    special = torch.isin(ids, torch.tensor(tokenizer().all_special_ids)) | (mask == 0)
    targets = labels != -100
    assert not (targets & special).any() and targets.any(1).all()
    assert torch.equal(labels[targets], ids[targets])
    assert torch.equal(masked[~targets], ids[~targets])  # only targets may change
    assert (masked[targets] == tokenizer().mask_token_id).any()


@pytest.mark.parametrize("fusion", ["early", "cross_attention", "hybrid"])
def test_captioning_never_sees_later_tokens(fusion: str) -> None:
    model = tiny(fusion).eval()
    pixels, ids, mask = inputs()
    out = model(pixels, ids, mask)
    changed = ids.clone()
    changed[:, 4:] = tokenizer().convert_tokens_to_ids("dog")
    a = model.caption_logits(out.image_tokens, ids, mask)
    b = model.caption_logits(out.image_tokens, changed, mask)
    torch.testing.assert_close(a[:, :4], b[:, :4])  # positions 0-3 predict from 0-3 only
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_vqa_targets_only_the_answer() -> None:
    qa = batch()
    targets = answer_targets(qa["qa_ids"], qa["qa_mask"])
    tok = tokenizer()
    assert tok.decode(targets[0][targets[0] != -100]) == "red [SEP]"
    assert (targets[1] == -100).all()  # no question: no target
    assert tok.decode(targets[2][targets[2] != -100]) == "two [SEP]"


def test_vqa_loss_without_questions_is_zero_and_finite() -> None:
    model = tiny("cross_attention")
    qa = batch() | tokenize_qa([""] * 4)
    total, terms = compute_losses(model, qa, {"vqa": 1.0})
    assert terms["vqa"].item() == 0.0
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_a_debiased_vqa_loss_is_the_decoder_times_each_questions_answer_prior() -> None:
    model, qa = tiny("cross_attention"), batch()
    plain = compute_losses(model, qa, {"vqa": 1.0})[1]["vqa"]
    model.answer_prior = AnswerPrior()
    torch.testing.assert_close(compute_losses(model, qa, {"vqa": 1.0})[1]["vqa"], plain)
    counts = model.answer_prior.counts  # nothing was counted before: the decoder alone
    assert sorted(tokenizer().decode(list(c)) for c in counts.values()) == ["diamond", "red", "two"]
    assert all(n == 1 for c in counts.values() for n in c.values())

    # Now each question's prior is log(1 + 1) on its answer's first token, and only there.
    out = model(qa["pixels"], qa["input_ids"], qa["attention_mask"])
    logits = model.caption_logits(out.image_tokens, qa["qa_ids"], qa["qa_mask"])[:, :-1]
    targets = answer_targets(qa["qa_ids"], qa["qa_mask"])[:, 1:]
    for row in (0, 2, 3):
        first = (targets[row] != -100).nonzero()[0, 0]
        logits[row, first, targets[row, first]] += torch.log(torch.tensor(2.0))
    expected = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=-100
    )
    debiased = compute_losses(model, qa, {"vqa": 1.0})[1]["vqa"]
    torch.testing.assert_close(debiased, expected)
    assert debiased < plain  # the prior explains part of the answer: less left for the decoder
    model.answer_prior = None
    torch.testing.assert_close(compute_losses(model, qa, {"vqa": 1.0})[1]["vqa"], plain)


def tokenize_qa(pairs: list) -> dict[str, torch.Tensor]:
    qa = tokenize(pairs, 16)
    return {"qa_ids": qa["input_ids"], "qa_mask": qa["attention_mask"]}


def test_pair_scores_full_and_shortlisted() -> None:
    pixels, ids, mask = inputs()
    late = tiny("late").eval()
    assert late.pair_scores(pixels, ids, mask).shape == (4, 4)
    hybrid = tiny("hybrid").eval()
    full = hybrid.pair_scores(pixels, ids, mask)
    assert torch.isfinite(full).all() and (full <= 0).all()  # match log-probabilities
    assert torch.equal(hybrid.pair_scores(pixels, ids, mask, shortlist=4), full)
    short = hybrid.pair_scores(pixels, ids, mask, shortlist=2)
    assert (torch.isfinite(short).sum(1) == 2).all()
    kept = torch.isfinite(short)
    torch.testing.assert_close(short[kept], full[kept])  # re-ranking scores are the same
    with pytest.raises(ValueError, match="no trained ITC"):
        tiny("film").eval().pair_scores(pixels, ids, mask, shortlist=2)


def test_loss_config_from_yaml_style_overrides() -> None:
    from mmcore.config import ConfigError, load_config
    from mmcore.losses.fusion import LossConfig

    cfg = load_config(LossConfig, None, ["terms={clip: 1.0, itm: 0.5}"])
    assert cfg.terms == {"clip": 1.0, "itm": 0.5}
    cfg.check("hybrid")
    with pytest.raises(ValueError, match="'late' does not support"):
        cfg.check("late")
    with pytest.raises(ConfigError, match="non-empty subset"):
        load_config(LossConfig, None, ["terms={contrastive: 1.0}"])
    with pytest.raises(ConfigError, match=">= 0"):
        load_config(LossConfig, None, ["terms={clip: -1}"])
    assert load_config(LossConfig, None, ["terms={clip: 1, vqa: 1}", "vqa_debias=true"]).vqa_debias
    with pytest.raises(ConfigError, match="add vqa to loss.terms"):
        load_config(LossConfig, None, ["vqa_debias=true"])


@pytest.mark.parametrize("fusion", ["film", "hybrid"])
def test_zeroshot_class_scores_for_fusion_models(fusion: str) -> None:
    from PIL import Image

    from mmcore.inference import Engine

    images = [Image.new("RGB", (70, 50), c) for c in ("red", "blue", "green")]
    scores = Engine(tiny(fusion)).class_scores(images, ["red", "blue"], ["a {} thing", "{}"])
    assert scores.shape == (3, 2) and torch.isfinite(scores).all()
