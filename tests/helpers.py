"""Servers only the tests start, on 127.0.0.1: PostgreSQL and an S3-compatible store (the
MLflow server test). The shared ones (image host, MLflow, curated shards) live in
``pipelines.local``, which the demo and the benchmarks use too."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import requests

from pipelines.local import Server


def sigkill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout_s: float = 180) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; it must still be running until then."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not ready():
        assert proc.poll() is None, "the job ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def interrupt_when_logged(
    proc: subprocess.Popen, log: Path, marker: str, sig: int = signal.SIGINT
) -> int:
    """Send ``sig`` (Ctrl-C's by default) to ``proc`` once ``marker`` is in its log ``log``;
    its exit code. It must run until then, and stop within 120 s after (killed otherwise)."""
    try:
        deadline = time.monotonic() + 300
        while marker not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)
        proc.send_signal(sig)
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()


def train_killing_a_worker(
    train: Callable[[], dict], ready: Callable[[], bool]
) -> tuple[dict, int]:
    """Run ``train()`` in a thread and SIGKILL one Ray Train worker process once ``ready()``
    holds (a checkpoint registered) while it goes on; returns the run's result and the killed
    pid. An exception of the run is raised here, with its own traceback."""
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = train()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread below
            box["error"] = e

    run = threading.Thread(target=target, daemon=True)
    run.start()
    killed, deadline = None, time.monotonic() + 300
    while killed is None and run.is_alive() and time.monotonic() < deadline:
        if ready():
            workers = [p for p in psutil.process_iter(["cmdline"])
                       if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]  # fmt: skip
            if workers:
                os.kill(workers[-1].pid, signal.SIGKILL)
                killed = workers[-1].pid
        time.sleep(0.05)
    run.join(timeout=600)
    if "error" in box:
        raise box["error"]
    assert not run.is_alive(), "the run did not end within 10 minutes of the kill"
    assert killed is not None, "no checkpoint and worker to kill before the run ended"
    return box["result"], killed


class PostgresServer(Server):
    """A real PostgreSQL (Debian's binaries) on 127.0.0.1, run as the ``postgres`` user (it
    refuses root), its data in a fresh folder that user can reach (pytest's are root-only);
    database ``mlflow``, owner ``mlflow``. The log goes to ``workdir``."""

    name = "postgres"
    BIN = Path("/usr/lib/postgresql/15/bin")

    def __init__(self, workdir: Path) -> None:
        import tempfile

        super().__init__(workdir)
        self.home = Path(tempfile.mkdtemp(prefix="mmray-pg-"))
        self.data = self.home / "data"
        self.uri = f"postgresql://mlflow:mlflow@127.0.0.1:{self.port}/mlflow"

    def _as_postgres(self, *args: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *args]

    def command(self) -> list[str]:
        shutil.chown(self.home, "postgres", "postgres")
        if not self.data.exists():
            subprocess.run(self._as_postgres(str(self.BIN / "initdb"), "-D", str(self.data),
                                             "-U", "postgres", "--auth=trust"),
                           check=True, capture_output=True)  # fmt: skip
        return self._as_postgres(
            str(self.BIN / "postgres"), "-D", str(self.data), "-p", str(self.port),
            "-c", "listen_addresses=127.0.0.1", "-k", str(self.home),
        )  # fmt: skip

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        shutil.rmtree(self.home, ignore_errors=True)

    def ready(self) -> bool:
        psql = self._as_postgres("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U",
                                 "postgres", "-tAc")  # fmt: skip
        if subprocess.run([*psql, "select 1"], capture_output=True).returncode:
            return False
        for sql in ("create user mlflow password 'mlflow'", "create database mlflow owner mlflow"):
            subprocess.run([*psql, sql], capture_output=True)
        return True

    def query(self, sql: str) -> str:
        out = subprocess.run(
            self._as_postgres("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                              "-d", "mlflow", "-tAc", sql),
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return out.stdout.strip()


class S3Server(Server):
    """An S3-compatible store on 127.0.0.1 (moto's server) with one bucket.

    With ``check_keys`` the store checks credentials as S3 does: it refuses every request
    whose access key it does not know (moto's IAM emulation: its first 3 requests, made here,
    create a user with full rights and its key); ``env`` then holds that key."""

    name = "s3"
    KEYS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip

    def __init__(self, workdir: Path, bucket: str = "mlflow", check_keys: bool = False) -> None:
        super().__init__(workdir)
        self.url, self.bucket, self.check_keys = f"http://127.0.0.1:{self.port}", bucket, check_keys
        self.keys = dict(self.KEYS)

    def command(self) -> list[str]:
        return [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1",
                "-p", str(self.port)]  # fmt: skip

    def env(self) -> dict[str, str]:
        return super().env() | ({"INITIAL_NO_AUTH_ACTION_COUNT": "3"} if self.check_keys else {})

    @property
    def client_env(self) -> dict[str, str]:
        """What a process needs to use the store: the AWS variables."""
        return self.keys | {"AWS_ENDPOINT_URL": self.url}

    def client(self, service: str = "s3"):
        import boto3

        return boto3.client(service, endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id=self.keys["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.keys["AWS_SECRET_ACCESS_KEY"])  # fmt: skip

    def ready(self) -> bool:
        if not requests.get(f"{self.url}/moto-api/data.json", timeout=1).ok:  # not an S3 call
            return False
        if self.check_keys:
            iam = self.client("iam")
            iam.create_user(UserName="mmray")
            allow = {"Effect": "Allow", "Action": "*", "Resource": "*"}
            policy = json.dumps({"Version": "2012-10-17", "Statement": [allow]})
            iam.put_user_policy(UserName="mmray", PolicyName="all", PolicyDocument=policy)
            key = iam.create_access_key(UserName="mmray")["AccessKey"]
            self.keys |= {"AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                          "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}  # fmt: skip
        self.client().create_bucket(Bucket=self.bucket)
        return True
