"""Generation from the image-grounded decoder (mmcore.generate)."""

from __future__ import annotations

import pytest
import torch

from mmcore.data.inputs import token_ids
from mmcore.generate import GenerationConfig, generate
from mmcore.losses.fusion import caption_loss
from mmcore.models.model import ModelConfig, build_model
from mmcore.models.towers import TextConfig, VisionConfig


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


def test_a_model_overfit_on_a_few_pairs_regenerates_their_captions() -> None:
    model = _model().train()
    captions = ["a large red circle", "a small blue square", "a green triangle above a cross"]
    pixels = torch.randn(3, 3, 32, 32)
    ids, mask = (torch.from_numpy(a) for a in token_ids(captions, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(150):
        loss = caption_loss(model, model(pixels, ids, mask), ids, mask)["caption"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for cfg in (GenerationConfig(), GenerationConfig(num_beams=3)):
        assert [t for t, _ in generate(model, pixels, cfg)] == captions


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
