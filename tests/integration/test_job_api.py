"""Ray's job API on a cluster with token authentication (what `ray.init()` and `ray start`
turn on by default since Ray 2.5x): a submit without the token is refused; with it, the job
runs. The demo's loopback cluster, run without auth, is checked to listen on 127.0.0.1 only
in tests/e2e/test_demo.py."""

from __future__ import annotations

import signal
import subprocess
import sys
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


def test_ctrl_c_while_the_demo_follows_a_stage_stops_that_stages_job(ray_cluster, tmp_path):
    """`mmray demo` follows each stage's Ray job; Ctrl-C there left the job running on the
    cluster (and printed a traceback) until 2026-12-08."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from pipelines.demo import auth_headers

    entry = "python -c 'import time; time.sleep(600)'"
    follow = (
        "from pathlib import Path\n"
        "from ray.job_submission import JobSubmissionClient\n"
        "from pipelines.demo import auth_headers, run_job\n"
        f"client = JobSubmissionClient({ray_cluster.dashboard!r}, headers=auth_headers())\n"
        f"run_job(client, 'sleep', {entry!r}, Path({str(tmp_path)!r}), {{}})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", follow], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    client = JobSubmissionClient(ray_cluster.dashboard, headers=auth_headers())

    def ours() -> list:
        return [j for j in client.list_jobs() if j.entrypoint == entry]

    try:
        deadline = time.monotonic() + 120
        while not any(j.status == JobStatus.RUNNING for j in ours()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 60
    while ours()[0].status != JobStatus.STOPPED and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ours()[0].status == JobStatus.STOPPED
