"""Ray's job API on a cluster with token authentication (what `ray.init()` and `ray start`
turn on by default since Ray 2.5x): a submit without the token is refused; with it, the job
runs. The demo's loopback cluster, run without auth, is checked to listen on 127.0.0.1 only
in tests/e2e/test_demo.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.integration
JOB = {"entrypoint": "python -c \"print('hello from a job')\""}


def test_a_submit_without_the_token_is_refused(ray_cluster) -> None:
    api = f"{ray_cluster.dashboard}/api/jobs/"
    refused = requests.post(api, json=JOB, timeout=30)
    assert refused.status_code in (401, 403), refused.text
    assert requests.get(api, timeout=30).status_code in (401, 403)

    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    auth = {"Authorization": f"Bearer {token}"}
    accepted = requests.post(api, json=JOB, headers=auth, timeout=30)
    assert accepted.ok, accepted.text
    job = accepted.json()["submission_id"]
    deadline, status = time.monotonic() + 120, None
    while time.monotonic() < deadline and status not in ("SUCCEEDED", "FAILED", "STOPPED"):
        status = requests.get(api + job, headers=auth, timeout=30).json()["status"]
        time.sleep(0.5)
    assert status == "SUCCEEDED"
    logs = requests.get(f"{api}{job}/logs", headers=auth, timeout=30).json()["logs"]
    assert "hello from a job" in logs
