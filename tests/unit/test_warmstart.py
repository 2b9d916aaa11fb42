"""Warm starts (``init.from``): a transformers CLIPModel folder or an mmray model as the
first weights, whole or in named parts, and the errors that come before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel

from mmcore.config import ConfigError, load_config, replace, to_dict
from mmcore.export import save_model
from mmcore.models.model import ModelConfig, build_model
from mmcore.models.towers import TEXT_SIZES, VISION_SIZES, TextConfig, tokenizer
from mmcore.training import TrainConfig
from mmcore.warmstart import InitConfig, group_of, plan

CLIP_LIKE = ModelConfig(text=TextConfig(kind="transformer"))  # patch stem, CLIP text tower


def hf_clip(folder: Path, vocab: int | None = None) -> CLIPModel:
    """A random transformers CLIPModel the size of mmray's tiny towers, saved to ``folder``."""
    tok = tokenizer()
    hidden, mlp, layers, heads, patch = VISION_SIZES["tiny"]
    t_hidden, t_mlp, t_layers, t_heads = TEXT_SIZES["tiny"]
    config = CLIPConfig(
        vision_config={"hidden_size": hidden, "intermediate_size": mlp, "patch_size": patch,
                       "num_hidden_layers": layers, "num_attention_heads": heads,
                       "image_size": 64},
        text_config={"vocab_size": vocab or tok.vocab_size, "hidden_size": t_hidden,
                     "intermediate_size": t_mlp, "num_hidden_layers": t_layers,
                     "num_attention_heads": t_heads, "max_position_embeddings": 32,
                     "pad_token_id": tok.pad_token_id, "bos_token_id": tok.cls_token_id,
                     "eos_token_id": tok.sep_token_id},
        projection_dim=128, logit_scale_init_value=3.0,
    )  # fmt: skip
    torch.manual_seed(1)
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    return model


def test_a_transformers_clip_folder_loads_with_identical_embeddings(tmp_path) -> None:
    hf = hf_clip(tmp_path / "hf")
    model = build_model(CLIP_LIKE)
    warm = plan(InitConfig(source=str(tmp_path / "hf")), model)
    assert warm.kind == "hf-clip" and warm.skipped == {}
    assert warm.fresh == ["logit_bias"]  # SigLIP's bias: CLIP has none
    model.load_state_dict(warm.state, strict=False)
    model.eval()

    pixels = torch.randn(3, 3, 64, 64)
    ids = tokenizer()(["a red circle", "two blue squares", "a"], padding="max_length",
                      max_length=32, truncation=True, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        theirs_img = F.normalize(hf.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        theirs_txt = F.normalize(hf.get_text_features(**ids).pooler_output, dim=-1)
        ours_img = model.encode_image(pixels)
        ours_txt = model.encode_text(ids["input_ids"], ids["attention_mask"])
    torch.testing.assert_close(ours_img, theirs_img, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_txt, theirs_txt, rtol=0, atol=1e-6)
    assert model.logit_scale.item() == pytest.approx(3.0)


def test_a_source_that_does_not_fit_fails_naming_the_tensors(tmp_path) -> None:
    hf_clip(tmp_path / "hf", vocab=1000)  # another tokenizer's vocabulary
    model = build_model(CLIP_LIKE)
    with pytest.raises(ConfigError, match=r"text\.model\.embeddings\.token_embedding\.weight: "
                       r"shape \(1000, 128\) in the source, \(30522, 128\) here"):  # fmt: skip
        plan(InitConfig(source=str(tmp_path / "hf")), model)
    # without the text tower it fits; not strict, the rest of the text tower loads
    assert plan(InitConfig(source=str(tmp_path / "hf"), modules=["vision"]), model).state
    loose = plan(InitConfig(source=str(tmp_path / "hf"), strict=False), model)
    assert "text.model.embeddings.token_embedding.weight" in loose.skipped
    assert "text.model.embeddings.token_embedding.weight" in loose.fresh
    assert "text.model.encoder.layers.0.mlp.fc1.weight" in loose.state

    with pytest.raises(ConfigError, match="holds no config.json"):
        plan(InitConfig(source=str(tmp_path / "nowhere")), model)
    with pytest.raises(ConfigError, match="unknown"):
        load_config(TrainConfig, None, ["data.path=x", "init.modules=[towers, decoder]"])


def test_named_parts_load_and_the_rest_stays_fresh(tmp_path) -> None:
    torch.manual_seed(0)
    source = build_model(ModelConfig(fusion="hybrid"))
    save_model(source, tmp_path / "src")
    torch.manual_seed(1)
    model = build_model(ModelConfig(fusion="hybrid"))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    init = InitConfig(source=str(tmp_path / "src"), modules=["towers", "projections"])
    warm = plan(init, model)
    model.load_state_dict(warm.state, strict=False)
    for key, value in model.state_dict().items():
        named = group_of(key) in {"vision", "text", "projections"}
        assert torch.equal(value, (source.state_dict() if named else fresh)[key]), key
    differ = [k for k in warm.fresh if not torch.equal(fresh[k], source.state_dict()[k])]
    assert {group_of(k) for k in differ} == {"fusion", "heads"}  # fresh weights, not the source's
    assert "fusion" in warm.describe() and warm.summary()["fresh"] == warm.fresh


def test_a_late_model_warm_starts_a_fusion_variant_only_where_it_has_the_parts(tmp_path) -> None:
    save_model(build_model(ModelConfig()), tmp_path / "late")
    hybrid = build_model(ModelConfig(fusion="hybrid"))
    with pytest.raises(ConfigError, match=r"image_to_fusion\.weight: not in the source"):
        plan(InitConfig(source=str(tmp_path / "late")), hybrid)
    warm = plan(InitConfig(source=str(tmp_path / "late"), modules=["towers", "projections"]),
                hybrid)  # fmt: skip
    assert {group_of(k) for k in warm.state} == {"vision", "text", "projections"}


def test_init_from_is_the_config_key() -> None:
    cfg = load_config(TrainConfig, None, ["data.path=x", "init.from=runs:/abc/model"])
    assert cfg.init.source == "runs:/abc/model" and to_dict(cfg)["init"]["from"] == cfg.init.source
    assert replace(cfg, {"init.strict": False}).init.source == "runs:/abc/model"
    with pytest.raises(ConfigError, match="unknown key.*init.source"):
        load_config(TrainConfig, None, ["data.path=x", "init.source=y"])
