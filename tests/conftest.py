"""Shared fixtures: sample data, a loopback image host, a real MLflow server, an S3-compatible
store that checks keys, and one real local Ray cluster with one set of curated shards for the
whole session (Ray's start-up and a curation are the suite's largest fixed costs)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from mmcore.data.sample import make_sample_data
from pipelines.job import RAY_SYSTEM_CONFIG
from pipelines.local import ImageServer, MlflowServer, curated_shards, free_port
from tests.helpers import S3Server

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

SUITE_DISK_GB = 10  # a full run peaks at ~9 GB under the temp folder: checkpoints, stores


def pytest_sessionstart(session: pytest.Session) -> None:
    """Say up front when the temp folder lacks the room a run needs: tests that fail for lack
    of disk (an MLflow server that cannot store a model, Ray that cannot spill) say little."""
    tmp = tempfile.gettempdir()
    free = shutil.disk_usage(tmp).free / 2**30
    if free < SUITE_DISK_GB:
        session.config.pluginmanager.get_plugin("terminalreporter").write_line(
            f"WARNING: {free:.1f} GB free under {tmp}; a full run writes about "
            f"{SUITE_DISK_GB - 1} GB there, so tests may fail for lack of disk"
        )


@pytest.fixture(scope="session", autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """mmray's caches (downloads, text features) in the session's temporary folder instead of
    ~/.cache: the Ray workers and CLI processes the tests start inherit it."""
    os.environ["MMRAY_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 300-row synthetic crawl (6 rows of each junk kind), shared by the session."""
    out = tmp_path_factory.mktemp("sample")
    make_sample_data(out, n=300, seed=1)
    return out


@pytest.fixture(scope="session")
def image_server(sample_dir: Path):
    with ImageServer(sample_dir / "images") as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    with MlflowServer(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """moto's S3 server on 127.0.0.1 with bucket ``mmray``, checking keys as S3 does. Its AWS
    variables are this process's (and so the Ray cluster's, which inherits them), as a user's
    would be: every ``s3://`` path resolves against it."""
    with S3Server(tmp_path_factory.mktemp("s3"), bucket="mmray", check_keys=True) as server:
        os.environ.update(server.client_env)
        yield server


@dataclasses.dataclass(frozen=True)
class Cluster:
    address: str  # the GCS address: RAY_ADDRESS for drivers in other processes
    dashboard: str  # http://127.0.0.1:PORT, the job and Serve REST APIs


@pytest.fixture(scope="session")
def ray_cluster(s3):
    """One local Ray for every test that needs one: 4 logical CPUs (2 training workers with
    Ray Data's tasks beside them), a small object store, the dashboard on loopback (Ray
    Train's placement-group cleaner and `serve deploy` use its API), the S3 variables set."""
    import ray

    port = free_port()
    ray.init(num_cpus=4, object_store_memory=400 << 20, include_dashboard=True,
             dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=False,
             _system_config=dict(RAY_SYSTEM_CONFIG))  # fmt: skip
    try:
        yield Cluster(ray.get_runtime_context().gcs_address, f"http://127.0.0.1:{port}")
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def shards(ray_cluster, sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample crawl curated into 64 px shards once, for training, tuning and serving."""
    return curated_shards(sample_dir, tmp_path_factory.mktemp("curated") / "shards")
