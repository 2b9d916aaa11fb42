"""`mmray serve` as a user runs it: a real process that starts its own local Ray and Serve,
answers on 127.0.0.1, and shuts down cleanly on SIGTERM; a bad config fails before any work."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch

from mmcore.export import save_model
from mmcore.models.model import ModelConfig, build_model
from mmcore.models.towers import TextConfig
from pipelines.local import free_port
from tests.helpers import interrupt_when_logged

pytestmark = pytest.mark.integration
MMRAY = str(Path(sys.executable).with_name("mmray"))


def test_mmray_serve_answers_and_stops_on_sigterm(tmp_path) -> None:
    torch.manual_seed(0)
    model = save_model(build_model(ModelConfig(text=TextConfig(kind="transformer"))), tmp_path)
    port = free_port()
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - lives with the process
    proc = subprocess.Popen(
        [MMRAY, "serve", "--model", str(model), "--port", str(port), "replicas.max_replicas=1"],
        stdout=subprocess.PIPE, stderr=log, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()  # one JSON line once the app is up
        assert line, f"mmray serve exited: {(tmp_path / 'serve.log').read_text()[-3000:]}"
        assert json.loads(line)["url"] == f"http://127.0.0.1:{port}", line
        url = f"http://127.0.0.1:{port}"
        assert requests.get(f"{url}/v1/model", timeout=30).json()["name"] == model.name
        out = requests.post(f"{url}/v1/embed", json={"texts": ["a red circle"]}, timeout=30)
        assert len(out.json()["text_embeddings"][0]) == 128
        no_index = requests.post(f"{url}/v1/search", json={"text": "a"}, timeout=30)
        assert no_index.status_code == 404 and "--index" in no_index.json()["error"]
        proc.send_signal(signal.SIGTERM)  # twice at once, as pkill reaching a wrapper and
        proc.send_signal(signal.SIGTERM)  # mmray does: the second once deadlocked the first
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = (tmp_path / "serve.log").read_text()
    assert "Connecting to existing Serve app" not in text and "graceful_shutdown failed" not in text
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the server is gone with the process
        try:
            requests.get(f"{url}/healthz", timeout=2)
        except requests.ConnectionError:
            break
        time.sleep(1)
    else:
        raise AssertionError("the server still answers after mmray serve exited")


def test_sigterm_while_serve_starts_interrupts_it_cleanly(tmp_path) -> None:
    """SIGTERM while the replica loads (Ray up, ``serve.run`` waiting): "interrupted", exit
    130, not Ray's stack dump and an abort."""
    torch.manual_seed(0)
    model = save_model(build_model(ModelConfig(text=TextConfig(kind="transformer"))), tmp_path)
    log_path = tmp_path / "serve.log"
    log = open(log_path, "w")  # noqa: SIM115 - lives with the process
    proc = subprocess.Popen([MMRAY, "serve", "--model", str(model), "--port", str(free_port())],
                            stdout=subprocess.PIPE, stderr=log, text=True)  # fmt: skip
    rc = interrupt_when_logged(proc, log_path, "progress: serve", signal.SIGTERM)
    assert rc == 130, log_path.read_text()[-3000:]
    text = log_path.read_text()
    assert "mmray serve: interrupted" in text and "SIGTERM received" not in text
    assert not proc.stdout.read()  # no result line


def test_bad_serve_config_fails_before_any_work() -> None:
    run = subprocess.run(
        [MMRAY, "serve", "--model", "x", "model.max_batch_size=128"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2 and "batches could never fill" in run.stderr
    assert "Started a local Ray" not in run.stderr
    run = subprocess.run([MMRAY, "serve", "--model", "x", "--port", "0"], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert run.returncode == 2 and "--port 0: need 1-65535" in run.stderr  # was: 8000 instead


def test_a_port_in_use_is_one_line_and_exit_2(tmp_path) -> None:
    """Another server on the port: one line that says so, not Ray's 80-line traceback of the
    proxy actor (exit 1); the local Ray stops with the command."""
    torch.manual_seed(0)
    model = save_model(build_model(ModelConfig(text=TextConfig(kind="transformer"))), tmp_path)
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        run = subprocess.run([MMRAY, "serve", "--model", str(model), "--port", str(port)],
                             capture_output=True, text=True, timeout=180)  # fmt: skip
    assert run.returncode == 2, run.stderr[-3000:]
    assert f"cannot listen on 127.0.0.1:{port}: is another server using it?" in run.stderr
    assert "Traceback" not in run.stderr and not run.stdout
