"""Config system: YAML + dotted overrides, strict keys and types, every shipped YAML loads."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Literal

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from mmcore.config import ConfigError, flatten, load_config, to_dict
from pipelines.api import ServeConfig, config_from
from pipelines.curate import CurateConfig
from pipelines.embed import EmbedConfig
from pipelines.train import TrainConfig
from pipelines.tune import SweepConfig


@dataclasses.dataclass(kw_only=True)
class Inner:
    lr: float = 1e-3
    mode: Literal["a", "b"] = "a"
    tags: list[str] = dataclasses.field(default_factory=list)

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError("lr must be positive")


@dataclasses.dataclass(kw_only=True)
class Outer:
    name: str = "x"
    steps: int = 10
    seed: int | None = None
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: exp\ninner:\n  lr: 0.1\n  mode: b\n")
    cfg = load_config(Outer, path, ["inner.lr=1e-4", "steps=5", "inner.tags=[p, q]", "seed=3"])
    assert cfg == Outer(
        name="exp", steps=5, seed=3, inner=Inner(lr=1e-4, mode="b", tags=["p", "q"])
    )
    assert flatten(to_dict(cfg))["inner.lr"] == 1e-4


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("inner.lrr=0.1", "unknown key(s) in inner: inner.lrr"),
        ("stepz=1", "unknown key(s): stepz"),
        ("steps=ten", "steps: expected an integer"),
        ("steps=true", "steps: expected an integer"),
        ("inner.mode=c", "inner.mode: 'c' is not one of"),
        ("inner.lr=-1", "inner: lr must be positive"),
        ("inner=3", "expected a mapping"),
        ("novalue", "not of the form"),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(Outer, None, [override])


JOBS = {
    "train": (TrainConfig, ["data.path=shards"]),
    "curate": (CurateConfig, ["input.path=meta.parquet", "output.path=shards"]),
    "tune": (SweepConfig, []),
    "embed": (EmbedConfig, ["model=m", "data=shards", "output=out"]),
}


@pytest.mark.parametrize(
    ("job", "override", "message"),
    [
        ("train", "schedule.max_steps=0", "schedule: need global_batch, max_steps and log_every"),
        ("train", "schedule.log_every=0", "schedule: need global_batch, max_steps and log_every"),
        ("train", "schedule.seed=-1", "schedule: need checkpoint_every >= 0, max_failures"),
        ("train", "scaling.num_workers=0", "scaling: need num_workers >= 1"),
        ("train", "model.vision.image_size=0", "model.vision: image_size must be a multiple"),
        ("train", "model.text.context_length=600", "context_length must be in [2, 512]"),
        ("train", "model.fusion_module.heads=3", "width divisible by heads"),
        ("train", "optim.betas=[0.9, 1.0]", "optim: need eps >= 0 and two betas in [0, 1)"),
        ("curate", "fetch.backoff_s=-1", "backoff_s >= 0"),
        ("curate", "image.max_pixels=0", "image: need max_pixels >= 1"),
        ("curate", "compute.process_threads=0", "compute: need rows_per_task, process_threads"),
        ("curate", "compute.num_cpus=0", "compute: need num_cpus > 0"),
        ("tune", "space.num_samples=0", "space: need num_samples >= 1"),
        ("tune", "space.seeds=[-1]", "seeds: [N >= 0, ...]"),
        ("tune", "asha.grace_evals=0", "asha: need grace_evals >= 1"),
        ("embed", "compute.prepare_cpus=0", "compute: need prepare_cpus > 0"),
    ],
)
def test_every_job_refuses_values_it_cannot_run(job: str, override: str, message: str) -> None:
    """Each of these used to pass the config and fail later, in a worker or task (division by
    zero, a negative sleep, a numpy seed), or quietly drop every image (max_pixels=0)."""
    cls, required = JOBS[job]
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(cls, None, [*required, override])


def test_unreadable_yaml(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(Outer, tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(Outer, tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", sorted(Path("pipelines/configs").rglob("*.yaml")), ids=str)
def test_every_shipped_config_loads(path: Path) -> None:
    if path.parent.name == "train":
        cfg = load_config(TrainConfig, path, ["data.path=x"])
        assert isinstance(cfg, TrainConfig)
        return
    if path.parent.name == "tune":
        sweep = load_config(SweepConfig, path, ["trial.data.path=x"])
        assert sweep.space.cells() and sweep.base.schedule.max_steps > 0
        return
    if path.stem == "serve":  # a Serve config file: Ray's own schema, then the app's args
        cfg, _ = config_from(path, [])
        assert ServeDeploySchema.model_validate(yaml.safe_load(path.read_text())).applications
        assert isinstance(cfg, ServeConfig)
        return
    jobs = {"curate": CurateConfig}
    cls = jobs[path.stem.split("_")[0]]
    cfg = load_config(cls, path, ["input.path=x", "output.path=y"])
    assert isinstance(cfg, cls)


def test_rayservice_serves_the_shipped_serve_config(tmp_path: Path) -> None:
    """cluster/kuberay/rayservice.yaml embeds pipelines/configs/serve.yaml (the proxy on
    0.0.0.0 for the Kubernetes service); Ray's schema accepts it and the app loads."""
    service = yaml.safe_load(Path("cluster/kuberay/rayservice.yaml").read_text())
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    shipped = yaml.safe_load(Path("pipelines/configs/serve.yaml").read_text())
    assert embedded["http_options"]["host"] == "0.0.0.0"
    for app in (embedded, shipped):
        app["http_options"]["host"] = "-"
    assert embedded == shipped
    (tmp_path / "serve.yaml").write_text(service["spec"]["serveConfigV2"])
    assert (
        config_from(tmp_path / "serve.yaml", [])[0]
        == config_from("pipelines/configs/serve.yaml", [])[0]
    )
