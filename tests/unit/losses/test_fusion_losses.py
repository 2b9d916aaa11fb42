"""ITM, MLM and captioning losses against hand-written references: one example at a time,
through the model's heads, cross-entropy written out as -log softmax."""

from __future__ import annotations

import torch

from mmcore.losses.fusion import caption_loss, itm_loss, mask_tokens, mlm_loss
from mmcore.models.model import ModelConfig, build_model
from mmcore.models.towers import TextConfig, tokenize

CAPTIONS = ["a red circle", "a small blue square above a green cross"]


def setup(fusion: str = "hybrid"):
    torch.manual_seed(0)
    model = build_model(ModelConfig(fusion=fusion, text=TextConfig(kind="transformer"))).eval()
    tokens = tokenize(CAPTIONS, 16)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return model, model(pixels, ids, mask), ids, mask


def nll(logits: torch.Tensor, target: int) -> torch.Tensor:
    return -logits.log_softmax(-1)[target]


@torch.no_grad()
def test_itm_is_the_mean_over_positives_and_both_kinds_of_negative() -> None:
    model, out, ids, mask = setup()
    # With 2 pairs, each row's only negative is the other row: the draw is determined.
    got = itm_loss(model, out, mask, torch.Generator().manual_seed(0))["itm"]
    terms = []
    for image, text, label in [(0, 0, 1), (1, 1, 1), (0, 1, 0), (1, 0, 0), (1, 0, 0), (0, 1, 0)]:
        logits = model.itm_logits(
            out.image_tokens[image : image + 1],
            out.text_tokens[text : text + 1],
            mask[text : text + 1],
        )[0]
        terms.append(nll(logits, label))  # fmt: skip
    torch.testing.assert_close(got, torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_mlm_predicts_each_masked_token_from_the_image_and_the_rest() -> None:
    model, out, ids, mask = setup()
    got = mlm_loss(model, out, ids, mask, torch.Generator().manual_seed(3))["mlm"]
    masked, labels = mask_tokens(ids, mask, generator=torch.Generator().manual_seed(3))
    terms = []
    for b in range(len(ids)):
        text_tokens, _ = model.text(masked[b : b + 1], mask[b : b + 1])
        logits = model.mlm_logits(out.image_tokens[b : b + 1], text_tokens, mask[b : b + 1])[0]
        terms += [
            nll(logits[t], int(labels[b, t])) for t in range(ids.shape[1]) if labels[b, t] >= 0
        ]
    assert terms  # at least one target per row
    torch.testing.assert_close(got, torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_caption_predicts_every_next_real_token() -> None:
    model, out, ids, mask = setup()
    got = caption_loss(model, out, ids, mask)["caption"]
    terms = []
    for b in range(len(ids)):
        logits = model.caption_logits(out.image_tokens[b : b + 1], ids[b : b + 1], mask[b : b + 1])
        for t in range(ids.shape[1] - 1):
            if mask[b, t + 1]:  # padding is never a target
                terms.append(nll(logits[0, t], int(ids[b, t + 1])))
    assert len(terms) == int(mask[:, 1:].sum())
    torch.testing.assert_close(got, torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)
