"""Training building blocks: DeepSpeed config, schedule, weight-decay groups, preprocessing."""

from __future__ import annotations

import itertools

import pytest
import torch

from mmcore.config import ConfigError, load_config
from mmcore.inference import trim_padding
from mmcore.models.model import ModelConfig, build_model
from mmcore.models.towers import TextConfig
from mmcore.training import (
    DataConfig,
    DeepSpeedConfig,
    OptimConfig,
    cosine_lr,
    deepspeed_config,
    param_groups,
)


def test_the_text_features_are_kept_in_mmray_cache_root(monkeypatch) -> None:
    monkeypatch.delenv("MMRAY_CACHE", raising=False)
    assert DataConfig().text_cache_dir == "~/.cache/mmray/text-features"  # each node's home
    monkeypatch.setenv("MMRAY_CACHE", "/scratch/mmray")
    assert DataConfig().text_cache_dir == "/scratch/mmray/text-features"


def test_deepspeed_config_from_mmray_config() -> None:
    ds = DeepSpeedConfig(stage=3, offload_optimizer=True, offload_params=True, grad_accum=2)
    cfg = deepspeed_config(ds, OptimConfig(grad_clip=0.5), global_batch=64, world=2)
    assert cfg["train_batch_size"] == 64 and cfg["train_micro_batch_size_per_gpu"] == 16
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["gradient_clipping"] == 0.5
    assert cfg["zero_optimization"] == {
        "stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"},
        "reduce_bucket_size": 5_000_000, "stage3_prefetch_bucket_size": 5_000_000,
    }  # fmt: skip
    assert not cfg["bf16"]["enabled"] and cfg["zero_allow_untested_optimizer"]
    with pytest.raises(ValueError, match="not divisible by workers × grad_accum = 4"):
        deepspeed_config(ds, OptimConfig(), global_batch=30, world=2)


@pytest.mark.parametrize(
    ("override", "message"),
    [("stage=4", "stage must be"), ("offload_params=true", "needs stage 3"),
     ("offload_optimizer=true", "needs ZeRO stage 1, 2 or 3")],
)  # fmt: skip
def test_bad_deepspeed_settings_fail_early(override: str, message: str) -> None:
    base = [] if "offload_optimizer" not in override else ["stage=0"]
    with pytest.raises(ConfigError, match=message):
        load_config(DeepSpeedConfig, None, [*base, override])


def test_cosine_schedule_warms_up_then_decays_to_zero() -> None:
    factors = [cosine_lr(s, max_steps=100, warmup=10) for s in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[55] == pytest.approx(0.5)
    assert factors[100] == pytest.approx(0.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))  # never rises after warm-up


def test_param_groups_exempt_gains_biases_and_scalars() -> None:
    model = build_model(ModelConfig(text=TextConfig(kind="transformer")))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"])
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert {"logit_scale", "logit_bias"} <= exempt
    assert any("layer_norm" in n for n in exempt) and any(n.endswith("bias") for n in exempt)
    total = len(decay["params"]) + len(no_decay["params"])
    assert total == sum(1 for p in model.parameters() if p.requires_grad)


def test_train_command_refuses_bad_input_before_any_work(tmp_path, capsys) -> None:
    from pipelines.train import main

    assert main(["--data", str(tmp_path)]) == 2  # a folder without shards
    assert "no .tar shards" in capsys.readouterr().err
    assert main(["--data", str(tmp_path), "loss.terms={itm: 1.0}"]) == 2  # late cannot do itm
    assert "does not support loss term(s) ['itm']" in capsys.readouterr().err
    assert main(["--data", str(tmp_path), "schedule.global_batch=15"]) == 2
    assert "not divisible" in capsys.readouterr().err
    for bad in ["schedule.max_steps=0", "schedule.log_every=0", "schedule.global_batch=0",
                "schedule.checkpoint_every=-1", "schedule.max_failures=-2",
                "scaling.num_workers=0", "scaling.cpus_per_worker=-1"]:  # fmt: skip
        assert main(["--data", str(tmp_path), bad]) == 2, bad
        section = bad.split(".")[0]
        assert f"{section}: need " in capsys.readouterr().err, bad
    (tmp_path / "00000.tar").touch()  # references are checked after the config's values
    assert main(["--data", str(tmp_path), "--zeroshot", str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    assert main(["--data", str(tmp_path / "nope")]) == 2
    assert f"data.path: {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    assert main(["--data", str(tmp_path), "data.val_fraction=1.5"]) == 2
    assert "val_fraction must be in [0, 1)" in capsys.readouterr().err
    assert main(["--data", str(tmp_path), "data.shuffle_buffer=-1"]) == 2
    assert "data.shuffle_buffer must be >= 0" in capsys.readouterr().err
    assert main(["--data", str(tmp_path), "data.text_cache=100"]) == 2  # a trainable tower
    assert "text_cache needs a locked text tower" in capsys.readouterr().err


def test_trim_padding_keeps_the_longest_caption() -> None:
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    ids = torch.arange(12).view(2, 6) * mask
    short_ids, short_mask = trim_padding(ids, mask)
    assert short_ids.tolist() == [[0, 1, 2], [6, 7, 0]] and short_mask.shape == (2, 3)
