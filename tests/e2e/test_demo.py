"""The user's path end to end: `mmray demo --quick` submits every stage with `ray job submit`'s
API to a local multi-node cluster (cluster/local.sh) and a real MLflow server, serves the
champion, and leaves it all running until `mmray demo --stop`. A failing job exits non-zero."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import requests
from ray.job_submission import JobStatus, JobSubmissionClient

from pipelines.demo import auth_headers, last_json
from pipelines.local import free_port

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(1500)  # the whole user path: a cluster, MLflow, four jobs, Serve
def test_demo_then_a_failing_job_then_stop(tmp_path) -> None:
    ports = {name: free_port() for name in ("mlflow", "dashboard", "gcs", "serve")}
    flags = ["--workdir", str(tmp_path / "demo"), "--quick"] + [
        f"--{name}-port={port}" for name, port in ports.items()
    ]
    dashboard = f"http://127.0.0.1:{ports['dashboard']}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    try:
        run = subprocess.run([str(BIN / "mmray"), "demo", *flags], capture_output=True,
                             text=True, timeout=1200, env=env)  # fmt: skip
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        steps = [line for line in run.stdout.splitlines() if line.startswith("[")]
        assert [s[:5] for s in steps] == [f"[{i}/7]" for i in range(1, 8)]
        for stage, unit in [("curate", "rows"), ("train", "steps"), ("tune", "samples"),
                            ("serve", "replicas")]:  # fmt: skip
            assert f"    progress: {stage} " in run.stdout and f" {unit} (" in run.stdout, stage
        swept = [x for x in run.stdout.splitlines() if x.startswith("    progress: tune ")]
        assert "(100%)" in swept[-1] and " | trials 2/2 | " in swept[-1]  # the sweep's budget
        # Readable: none of the libraries' chatter in the demo's output or the jobs' logs.
        logs = [f.read_text() for f in (tmp_path / "demo" / "logs").glob("*.log")]
        for noise in ["Downloading artifacts", "all_gather_into_tensor", "is now ignored by "
                      "default", "INFO dashboard_sdk", "execution finished in",
                      "Setting accelerator to CPU", "PreemptionWatcher",
                      "exclude_resources", "Loading checkpoint shards",
                      "serialized using CloudPickle", "Checkpoint successfully created",
                      "Reporting training result", "Validating input example",
                      "Connecting to existing Serve app"]:  # fmt: skip
            assert not any(noise in text for text in [run.stdout, run.stderr, *logs]), noise
        summary = json.loads(run.stdout.strip().splitlines()[-1])
        assert summary["samples_kept"] > 100 and summary["trials"] == 2
        assert summary["champion"].startswith("models:/mmray-tiny/")
        # The model the sweep fine-tuned competes too: the champion is never the worse of them.
        shape = "eval/zeroshot/shape/top1"
        assert summary["champion_metrics"][shape] >= summary["train_metrics"][shape]
        assert summary["classify_ms_p95"] > 0 and summary["train_metrics"]
        assert summary["classify_of"] == 20 and summary["search_hits"] == 5
        _report_renders(Path(summary["report"]))

        # Left running: the app, MLflow with the runs, the cluster with two nodes and the jobs.
        assert requests.get(f"{summary['serve']}/healthz", timeout=10).ok
        assert requests.get(f"{summary['mlflow']}/health", timeout=10).ok
        client = JobSubmissionClient(dashboard, headers=auth_headers())
        jobs = {j.entrypoint.split()[2]: j.status for j in client.list_jobs()}
        assert jobs == {f"pipelines.{s}": JobStatus.SUCCEEDED
                        for s in ("curate", "train", "tune", "serve")}  # fmt: skip
        nodes = requests.get(f"{dashboard}/nodes?view=summary", headers=auth_headers(),
                             timeout=10).json()  # fmt: skip
        assert len(nodes["data"]["summary"]) == 2
        # A development cluster: its dashboard and job server, the MLflow server and the app
        # answer on the loopback interface only.
        for port in (ports["dashboard"], ports["mlflow"], ports["serve"]):
            listening = {
                c.laddr.ip
                for c in psutil.net_connections("tcp")
                if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
            }
            assert listening == {"127.0.0.1"}, (port, listening)  # fmt: skip

        # The job CLI needs the cluster's token (Ray 2.60's token auth)...
        cli = env | {"RAY_ADDRESS": dashboard, "RAY_AUTH_MODE": "token"}
        no_token = env | {"RAY_ADDRESS": dashboard}
        refused = subprocess.run([str(BIN / "ray"), "job", "list"], capture_output=True,
                                 text=True, timeout=120, env=no_token)  # fmt: skip
        assert refused.returncode != 0 and "token" in refused.stdout + refused.stderr
        # ... and with it a failing job is reported as such with a non-zero exit code.
        failed = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--working-dir", str(ROOT), "--",
             "python", "-m", "pipelines.curate", "--input", str(tmp_path / "missing.parquet"),
             "--output", str(tmp_path / "out")],
            capture_output=True, text=True, timeout=300, env=cli,
        )  # fmt: skip
        assert failed.returncode != 0
        assert "failed" in (failed.stdout + failed.stderr).lower()
        assert "missing.parquet" in failed.stdout + failed.stderr

        # A user's own job on the two-node cluster: a relative input in its working directory
        # (which vanished when the driver connected, before each node had its own temp dir)
        # and no MLFLOW_TRACKING_URI on the nodes.
        work = tmp_path / "userjob"
        work.mkdir()
        shutil.copy(tmp_path / "demo" / "raw" / "metadata.parquet", work / "meta.parquet")
        out = tmp_path / "user-shards"

        config = str(ROOT / "pipelines/configs/curate_tiny.yaml")

        def submit(*args: str) -> str:
            run = subprocess.run(
                [str(BIN / "ray"), "job", "submit", "--working-dir", str(work), "--", "python",
                 "-m", "pipelines.curate", "--config", config, "--input", "meta.parquet", *args],
                capture_output=True, text=True, timeout=300, env=cli,
            )  # fmt: skip
            return f"rc={run.returncode}\n{run.stdout}{run.stderr}"

        refused = submit("--output", str(out))  # the embedded store would vanish with the job
        assert not refused.startswith("rc=0") and "without MLFLOW_TRACKING_URI" in refused
        refused = submit("--output", "shards", "tracking.enabled=false")
        assert not refused.startswith("rc=0") and "output.path='shards' is relative" in refused
        done = submit("--output", str(out), "tracking.enabled=false")
        assert done.startswith("rc=0"), done[-3000:]
        assert last_json(done)["n_input"] == summary["samples_in"]
        assert (out / "manifest.json").exists()

        # The same user runs mmray on this machine: it joins the cluster it finds running
        # here (its tasks run on the nodes, whose working directory is not the user's) with
        # the token it finds, and relative paths. Before, auth on in the driver and off on
        # the nodes failed every task (OwnerDiedError), and relative paths resolved in the
        # nodes' directory.
        local = subprocess.run(
            [str(BIN / "mmray"), "curate", "--config", config, "--input", "meta.parquet",
             "--output", "local-shards", "tracking.enabled=false"],
            cwd=work, capture_output=True, text=True, timeout=300, env=env,
        )  # fmt: skip
        assert local.returncode == 0, local.stderr[-3000:]
        assert "Connected to Ray cluster" in local.stderr  # joined, not a Ray of its own
        assert last_json(local.stdout)["digest"] == last_json(done)["digest"]
    finally:
        subprocess.run([str(BIN / "mmray"), "demo", "--stop", "--workdir", str(tmp_path / "demo")],
                       timeout=120, env=env)  # fmt: skip
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{dashboard}/api/version", timeout=5)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{ports['mlflow']}/health", timeout=5)


def _report_renders(report: Path) -> None:
    """The demo's report in headless Chromium (the page test's): every section there, every
    chart and thumbnail decoded."""
    from playwright.sync_api import sync_playwright

    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update"]  # fmt: skip
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=flags)
        page = browser.new_page()
        page.goto(report.as_uri())
        for section in ("summary", "curation", "training", "ablation", "classify", "search"):
            assert page.locator(f"#{section}").count() == 1, section
        assert page.locator("#ablation img").count() == 2  # the sweep's two plots
        assert page.locator("#classify .card").count() == 20
        assert page.locator("#search .card").count() == 5
        widths = page.evaluate("[...document.images].map(i => i.complete && i.naturalWidth)")
        assert len(widths) == 2 + 2 + 20 + 5 and min(widths) > 0  # every image decoded
        browser.close()
