"""`cluster/local.sh down` (and so `mmray demo --stop`) ends its own cluster only: two real
`ray start --head` clusters, one stopped by its port, the other still running. And
`mmray demo --stop` returns once its MLflow server is gone, not while it is still answering."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
import requests

from pipelines import demo
from pipelines.local import free_port

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")


def _start_head(port: int, temp: Path) -> None:
    subprocess.run(
        [str(RAY), "start", "--head", f"--port={port}", "--num-cpus=1", f"--temp-dir={temp}",
         "--include-dashboard=false", "--object-store-memory=80000000",
         "--disable-usage-stats"],
        check=True, capture_output=True, env=os.environ | {"RAY_USAGE_STATS_ENABLED": "0"},
    )  # fmt: skip


def test_stopping_one_cluster_leaves_another_running() -> None:
    stop = demo.cluster_stop()
    ports = [free_port(), free_port()]
    # Short temp folders: a node's Unix sockets live there (at most 107 characters a path).
    temps = [Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp")) for _ in ports]
    try:
        for port, temp in zip(ports, temps, strict=True):
            _start_head(port, temp)
        mine, other = (stop.cluster_processes(port) for port in ports)
        names = [{p.name() for p in procs} for procs in (mine, other)]
        assert all({"gcs_server", "raylet"} <= n for n in names), names
        assert not {p.pid for p in mine} & {p.pid for p in other}
        # Every process that names the first cluster's GCS address is among its processes.
        naming = {p.pid for p in psutil.process_iter(["cmdline"])
                  if f":{ports[0]}" in " ".join(p.info["cmdline"] or [])}  # fmt: skip
        assert naming and naming <= {p.pid for p in mine}

        out = subprocess.run([sys.executable, str(ROOT / "cluster" / "stop.py"), str(ports[0])],
                             check=True, capture_output=True, text=True).stdout  # fmt: skip
        assert f"processes of the Ray cluster on port {ports[0]}" in out
        assert not [p.pid for p in mine if p.is_running()]
        assert all(p.is_running() for p in other)
        assert stop.cluster_processes(ports[0]) == []
    finally:
        for port in ports:
            stop.stop(port)
        for temp in temps:
            shutil.rmtree(temp, ignore_errors=True)
    assert not [p for p in other if p.is_running()]


def test_demo_stop_returns_once_the_mlflow_server_is_gone(tmp_path: Path) -> None:
    port = free_port()
    pid, url = demo.start_mlflow(tmp_path, port)
    group = [p for p in psutil.process_iter() if demo._pgid(p.pid) == pid]
    assert len(group) >= 2, group  # the server and its worker
    state = {"mlflow_pid": pid, "dashboard_port": free_port(), "gcs_port": free_port()}
    (tmp_path / demo.STATE).write_text(json.dumps(state))
    try:
        assert demo.stop(tmp_path) == 0
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{url}/health", timeout=5)
        assert not [p for p in group if p.is_running()]
        assert not (tmp_path / demo.STATE).exists()
    finally:
        demo.stop_session(pid, grace_s=1)
