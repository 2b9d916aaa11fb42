"""The cluster and infra files: Ray's own launcher validation, and every entrypoint names a real
module and real config files that load."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from mmcore.config import load_config
from pipelines import job
from pipelines.curate import CurateConfig
from pipelines.train import TrainConfig
from pipelines.tune import SweepConfig

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "cluster" / "kuberay"
APP = "/app/"  # where the images put the repository
JOBS = {"pipelines.curate": CurateConfig, "pipelines.train": TrainConfig,
        "pipelines.tune": SweepConfig}  # fmt: skip


def test_launcher_config_passes_rays_validation() -> None:
    config = yaml.safe_load((ROOT / "cluster/launcher.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    assert {"head", "cpu_data", "gpu_train"} == set(config["available_node_types"])
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_train"]["max_wrkers"] = 4  # a typo Ray must refuse
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def entrypoint_config(entrypoint: str) -> tuple[str, Path, list[str]]:
    """``python -m MODULE --config /app/FILE ... key=value`` → module, repo file, overrides."""
    args = shlex.split(entrypoint)
    assert args[:2] == ["python", "-m"], entrypoint
    config = Path(args[args.index("--config") + 1])
    assert str(config).startswith(APP), f"{config}: the images hold the repo at {APP}"
    overrides = [a for a in args[3:] if "=" in a and not a.startswith("-")]
    return args[2], ROOT / str(config).removeprefix(APP), overrides


@pytest.mark.parametrize("path", sorted(KUBERAY.glob("rayjob-*.yaml")), ids=lambda p: p.name)
def test_rayjobs_run_real_modules_with_real_configs(path: Path) -> None:
    job = yaml.safe_load(path.read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    cluster = yaml.safe_load((KUBERAY / "raycluster.yaml").read_text())
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    module, config, overrides = entrypoint_config(job["spec"]["entrypoint"])
    assert importlib.util.find_spec(module) is not None and config.is_file()
    assert callable(importlib.import_module(module).main)
    match module:  # the config file and the job's overrides load as that job's config
        case "pipelines.curate":
            load_config(CurateConfig, config, ["input.path=x", "output.path=y", *overrides])
        case "pipelines.train":
            load_config(TrainConfig, config, ["data.path=x", *overrides])
        case "pipelines.tune":
            load_config(SweepConfig, config, overrides)
        case _:
            raise AssertionError(f"{module} is not a job module")


def test_rayservice_imports_the_serve_app() -> None:
    service = yaml.safe_load((KUBERAY / "rayservice.yaml").read_text())
    for app in yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]:
        module, attr = app["import_path"].split(":")
        assert callable(getattr(importlib.import_module(module), attr))


def test_kuberay_parameters_are_in_one_place() -> None:
    """Every Ray pod takes the kustomize image and the mmray-env ConfigMap."""
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    (env,) = kustomization["configMapGenerator"]
    literals = dict(item.split("=", 1) for item in env["literals"])
    assert "MLFLOW_TRACKING_URI" in literals
    containers = []
    for name in ("raycluster.yaml", "rayservice.yaml"):
        spec = yaml.safe_load((KUBERAY / name).read_text())["spec"]
        spec = spec.get("rayClusterConfig", spec)
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        containers += [c for g in groups for c in g["template"]["spec"]["containers"]]
    assert containers and all(c["image"] == image["name"] for c in containers)
    assert all({"configMapRef": {"name": env["name"]}} in c["envFrom"] for c in containers)


def test_every_cluster_recipe_keeps_idle_workers_as_a_local_ray_does() -> None:
    """The idle-worker policy of the Ray a job starts for itself (pipelines/job.py), set on
    every cluster we ship: without it a job's later datasets start new worker processes."""
    with pytest.raises(TypeError):  # ray.init writes into the dict it gets: it gets a copy
        job.RAY_SYSTEM_CONFIG["object_spilling_config"] = "{}"  # type: ignore[index]
    ((key, value),) = job.RAY_SYSTEM_CONFIG.items()
    variable = f"RAY_{key}"  # Ray reads each system config key from RAY_<key>
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    assert f"{variable}={value}" in kustomization["configMapGenerator"][0]["literals"]
    launcher = yaml.safe_load((ROOT / "cluster/launcher.yaml").read_text())
    assert f"-e {variable}={value}" in launcher["docker"]["run_options"]
    assert f"export {variable}=${{{variable}:-{value}}}" in (ROOT / "cluster/local.sh").read_text()


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_images_build_on_rays_image_with_the_pinned_stack(name: str) -> None:
    text = (ROOT / "infra" / name).read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    ray_version = pyproject.split("ray[")[1].split("==")[1].split('"')[0]
    assert f"FROM rayproject/ray:{ray_version}-py311-" in text
    assert "torch==2.13.0" in text  # the release the tests run on
    copied = [line.split()[-2] for line in text.splitlines() if line.startswith("COPY ")]
    for source in copied:
        assert (ROOT / source).exists(), f"{name} copies {source}, which is not in the repo"


def test_mlflow_server_uses_a_database_and_an_s3_store() -> None:
    compose = yaml.safe_load((ROOT / "infra/mlflow/docker-compose.yaml").read_text())
    command = compose["services"]["mlflow"]["command"]
    assert "--backend-store-uri postgresql://" in command and "s3://" in command
    assert {"postgres", "minio"} <= set(compose["services"])
    published = [p for s in compose["services"].values() for p in s.get("ports", [])]
    assert published and all(p.startswith("127.0.0.1:") for p in published)  # loopback only
    k8s = list(yaml.safe_load_all((ROOT / "infra/mlflow/kubernetes.yaml").read_text()))
    service = next(d for d in k8s if d["kind"] == "Service")
    uri = dict(
        item.split("=", 1)
        for item in yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())[
            "configMapGenerator"
        ][0]["literals"]
    )["MLFLOW_TRACKING_URI"]
    port = service["spec"]["ports"][0]["port"]
    assert (
        uri == f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc:{port}"
    )
