"""The drivers' Ray-free parts: the flag table, the sweep's trial configs and ablation table,
and the Serve API's request checks."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from mmcore.config import ConfigError, load_config, merge, replace
from mmcore.models.variants import trains_decoder
from mmcore.serving import BadInput, Limits
from mmcore.training import TrainConfig
from pipelines import ablation, api, curate, flags, train, tune

TINY = "pipelines/configs/train/tiny.yaml"


def test_flags_set_typed_values_that_overrides_then_win(monkeypatch) -> None:
    monkeypatch.chdir(flags.SOURCE)
    cfg = train.parse_args(["--config", TINY, "--data", "123", "--zeroshot", "a", "--zeroshot",
                            "b", "data.val_fraction=0.1"])  # fmt: skip
    assert cfg.data.path == "123" and cfg.eval.zeroshot == ["a", "b"]  # a string, a list
    assert train.parse_args(["--config", TINY, "--data", "x", "data.path=y"]).data.path == "y"
    cfg = curate.parse_args(["--input", "m.parquet", "--output", "o", "--image-size", "32"])
    assert cfg.image.image_size == 32
    with pytest.raises(SystemExit):  # argparse: an int flag given a word
        curate.parse_args(["--input", "m", "--output", "o", "--image-size", "big"])
    assert "--samples-per-shard" in flags.usage() and "trial.data.path" in flags.usage()


def test_merge_sets_dotted_keys_and_replaces_mappings() -> None:
    data = {"loss": {"terms": {"clip": 1.0}}, "optim": {"lr": 1.0}}
    out = merge(data, {"loss.terms": {"siglip": 1.0}, "optim.lr": 2.0, "new.key": 3})
    assert out == {"loss": {"terms": {"siglip": 1.0}}, "optim": {"lr": 2.0}, "new": {"key": 3}}
    assert data["optim"]["lr"] == 1.0  # a copy
    with pytest.raises(ConfigError, match="is not a section"):
        merge(data, {"optim.lr.x": 1})
    cfg = load_config(TrainConfig, TINY, ["data.path=x"])
    assert replace(cfg, {"optim.lr": 5e-4}).optim.lr == 5e-4
    with pytest.raises(ConfigError, match="not divisible"):  # validated again
        replace(cfg, {"schedule.global_batch": 15})


def test_the_generative_sweep_selects_on_vqa_over_the_decoders(monkeypatch) -> None:
    monkeypatch.chdir(flags.SOURCE)
    config = ["--config", "pipelines/configs/tune/generative.yaml", "--data", "s"]
    sweep = tune.parse_args(config)
    assert sweep.metric == "eval/vqa/accuracy" and sweep.mode == "max"
    cells = sweep.space.cells()
    assert len(cells) == 5 and {c["model.fusion"] for c in cells} == {"cross_attention", "hybrid"}
    # every cell trains the decoder, so every trial logs both generative metrics
    assert all(trains_decoder(c["model.fusion"], c["loss.terms"]) for c in cells)
    assert {tuple(sorted({"caption", "vqa"} & set(c["loss.terms"]))) for c in cells} == {
        ("caption",), ("vqa",), ("caption", "vqa")}  # fmt: skip
    assert tune.parse_args([*config, "metric=eval/caption/cider"]).metric == "eval/caption/cider"


def test_a_sweep_finds_its_training_config_here_beside_it_or_in_mmray(
    tmp_path, monkeypatch
) -> None:  # fmt: skip
    repo = flags.SOURCE
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "train.yaml").write_text("schedule: {global_batch: 32}\n")
    sweep = tmp_path / "exp" / "sweep.yaml"
    sweep.write_text("train: train.yaml\n")
    monkeypatch.chdir(repo)  # not where the sweep is
    assert tune.parse_args(["--config", str(sweep), "--data", "s"]).base.schedule.global_batch == 32
    sweep.write_text("train: pipelines/configs/train/tiny.yaml\n")  # the shipped form
    assert tune.parse_args(["--config", str(sweep)]).train == "pipelines/configs/train/tiny.yaml"
    monkeypatch.chdir(tmp_path)  # the shipped form from elsewhere: mmray's own YAML
    shipped = tune.parse_args(["--config", str(sweep), "--data", "s"])
    assert shipped.train == f"{repo}/pipelines/configs/train/tiny.yaml"
    assert shipped.base.model.vision.stem == "conv"  # tiny.yaml's, not the default
    sweep.write_text("train: configs/nowhere.yaml\n")  # nowhere: said before any work
    with pytest.raises(ConfigError, match="cannot read config configs/nowhere.yaml"):
        tune.check(tune.parse_args(["--config", str(sweep), "--data", "s"]))


def test_a_shipped_config_loads_from_any_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # a user's own folder: data/ here, mmray installed elsewhere
    argv = ["--config", "pipelines/configs/train/tiny.yaml", "--data", "data/shards"]
    assert train.parse_args(argv).model.vision.stem == "conv"  # tiny.yaml's, not the default
    (tmp_path / "pipelines" / "configs" / "train").mkdir(parents=True)  # a copy here wins
    (tmp_path / argv[1]).write_text("model: {vision: {stem: patch}}\n")
    assert train.parse_args(argv).model.vision.stem == "patch"
    with pytest.raises(ConfigError, match="cannot read config configs/tiny.yaml"):
        train.parse_args(["--config", "configs/tiny.yaml"])  # in neither: said as before


def test_a_sweep_builds_its_base_once_and_trials_from_it(monkeypatch) -> None:
    monkeypatch.chdir(flags.SOURCE)
    sweep = tune.parse_args(["--config", "pipelines/configs/tune/tiny.yaml", "--data", "s",
                             "trial.schedule.global_batch=32"])  # fmt: skip
    assert sweep.base is sweep.base  # built once
    assert sweep.base.schedule.max_steps == 19_200 // 32 and sweep.base.data.path.endswith("/s")
    config = {
        "base": sweep.base,
        "cell": {"model.fusion": "hybrid", "loss.terms": {"clip": 1.0}},
        "seed": 3,
        "sample": {"schedule.global_batch": 64},
        "samples_per_trial": 6400,
    }
    trial = tune.trial_config(config)  # fmt: skip
    assert (trial.model.fusion, trial.loss.terms, trial.schedule.seed) == (
        "hybrid",
        {"clip": 1.0},
        3,
    )
    assert trial.schedule.max_steps == 100  # the budget in samples stays fixed
    assert sweep.base.model.fusion == "late"  # the base is not changed by a trial


def test_ablation_rows_rank_trials_and_count_the_compute_saved(tmp_path) -> None:
    def trial(name, fusion, value, step, batch=None):
        sample = {"schedule.global_batch": batch} if batch else {}
        history = pd.DataFrame({"step": [2, step], "eval/m": [value / 2, value]})
        config = {"cell": {"model.fusion": fusion, "loss.terms": {"clip": 1.0, "itm": 1.0}},
                  "seed": 0, "sample": sample}  # fmt: skip
        return ablation.Trial(name, config, {"step": step, "eval/m": value}, history)

    trials = [trial("a", "late", 0.2, 6), trial("b", "hybrid", 0.5, 2, batch=32),
              ablation.Trial("c", trial("c", "late", 0, 0).config, {})]  # fmt: skip
    rows = ablation.ablation_rows(trials, "eval/m", "max", 96, 16, {"a": "runs:/a/model"})
    assert [r["trial"] for r in rows] == ["b", "a", "c"]  # best first, unscored last
    assert rows[0]["loss"] == "clip+itm" and rows[0]["status"] == "stopped early"
    assert rows[0]["samples_seen"] == 64 and rows[0]["steps_saved"] == 96 // 32 - 2
    assert rows[1]["status"] == "finished" and rows[1]["steps_saved"] == 0
    assert ablation.markdown(rows).splitlines()[2].startswith("| b | hybrid | clip+itm | 0 |")
    assert ablation.to_csv(rows).splitlines()[0].startswith("trial,fusion,loss,seed")
    plots = ablation.plots(trials, rows, "eval/m", tmp_path)
    assert all(p.stat().st_size > 1000 for p in plots)
    # Ties rank by trial id whatever order the trials come in (a restored sweep's differs).
    tied = [trial("e", "late", 0.5, 6), trial("d", "late", 0.5, 6)]
    for order in (tied, tied[::-1]):
        rows = ablation.ablation_rows(order, "eval/m", "max", 96, 16, {})
        assert [r["trial"] for r in rows] == ["d", "e"]


def test_request_checks_refuse_with_a_status_and_a_message() -> None:
    limits = Limits(max_images=2, max_labels=3)
    with pytest.raises(BadInput, match="distinct") as e:
        api.check_classify(api.ClassifyRequest(image="x", labels=["a", "a"]), limits, ["{}"])
    assert e.value.status == 422
    with pytest.raises(BadInput, match="at most 3") as e:
        api.check_classify(api.ClassifyRequest(image="x", labels=list("abcd")), limits, ["{}"])
    assert e.value.status == 413
    req = api.ClassifyRequest(image="x", labels=["a"], templates=["a {}."])
    assert api.check_classify(req, limits, ["{}"]) == ["a {}."]
    with pytest.raises(BadInput, match="exactly one of text or image"):
        api.check_search(api.SearchRequest(), limits)
    with pytest.raises(BadInput, match="at most 2"):
        api.check_embed(api.EmbedRequest(images=["x"] * 3), limits)
    with pytest.raises(BadInput, match="send texts and/or images"):
        api.check_embed(api.EmbedRequest(), limits)
    with pytest.raises(BadInput, match="at least 1"):
        api.check_match(api.MatchRequest(image="x", texts=[]), limits)


def test_index_and_embed_drivers_start_without_the_model_code() -> None:
    """`mmray index` (and `mmray embed --help`) needs neither torch nor the model code: the
    fusion variants' table is torch-free (mmcore.models.variants)."""
    code = (
        "import sys; from pipelines import embed, index\n"
        "print(sorted({'torch', 'transformers', 'mmcore.models.model'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
