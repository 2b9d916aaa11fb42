"""Shared fixtures: sample data, a loopback image host, a real MLflow server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mmcore.data.sample import make_sample_data
from pipelines.local import ImageServer, MlflowServer

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


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
