"""Real servers on 127.0.0.1 and sample shards, shared by the demo, the tests and the
benchmarks: an HTTP image host with misbehaving routes, a lean MLflow server, and the sample
crawl curated into shards.

    with ImageServer(Path("data/raw/images")) as host: ...   # host.url
    with MlflowServer(Path("/tmp/mlflow")) as server: ...     # server.url
    python -m pipelines.local ROOT PORT                       # a standalone image host
"""

from __future__ import annotations

import collections
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import requests


def mlflow_server(port: int, backend: str, artifacts: str) -> tuple[list[str], dict[str, str]]:
    """The command and environment of a lean ``mlflow server`` on 127.0.0.1: one worker and
    no job runner (~0.5 GB instead of ~3 GB); the demo's and the tests'."""
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1", "--backend-store-uri", backend,
               "--artifacts-destination", artifacts]  # fmt: skip
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                        "MLFLOW_DISABLE_TELEMETRY": "true"}  # fmt: skip
    return command, env


def curated_shards(sample_dir: Path, out: Path) -> Path:
    """Curate the sample crawl and its questions into 64 px shards (needs a running Ray)."""
    from mmcore.config import load_config
    from pipelines.curate import CurateConfig
    from pipelines.curate import run as curate
    from pipelines.flags import SOURCE

    overrides = [f"input.path={sample_dir / 'metadata.parquet'}", f"output.path={out}",
                 f"input.qa={sample_dir / 'qa.parquet'}"]  # fmt: skip
    config = SOURCE / "pipelines/configs/curate_tiny.yaml"
    cfg = load_config(CurateConfig, config, [*overrides, "tracking.enabled=false"])
    curate(cfg)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    """Whether something listens on (or holds) ``port`` of the loopback interface. As the
    servers do, SO_REUSEADDR: the closed connections of a server just stopped (TIME_WAIT,
    a minute) do not count."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


class ImageServer:
    """Serves ``root`` over HTTP on 127.0.0.1, with misbehaving endpoints:

        /images/NAME        the file (404 when missing); ``delay_s`` before each answer; a
                            NAME in ``hold`` waits until ``released`` is set (at most 60 s)
        /status/CODE        an empty answer with that HTTP status
        /slow/SECONDS       waits, then answers 200 with a few bytes
        /late/SECONDS/NAME  waits, then sends the file (a slow host)
        /drop               closes the connection without an answer
        /drip               sends one byte every 0.2 s for up to 30 s (never a full body)
        /flaky/NAME         503 on the first request for NAME, then the file
        /redirect/NAME      302 to /images/NAME; /loop redirects to itself
        /robots/TAG/NAME    the file with the header ``X-Robots-Tag: TAG`` (TAG URL-quoted)
        /busy/SECONDS/NAME  429 with ``Retry-After: SECONDS`` on the first request, then the file
    ``max_in_flight[path]``: the most requests for ``path`` it held at once, each from its
    arrival to the start of its answer (once the answer is sent, the client may send its next
    request before this thread has finished: counting to the end would see phantom overlaps).
    """

    def __init__(self, root: Path, delay_s: float = 0.0, port: int = 0) -> None:
        self.root, self.delay_s = Path(root), delay_s
        self.hold: set[str] = set()  # images whose answer waits for `released`
        self.released = threading.Event()
        self.hits: collections.Counter[str] = collections.Counter()
        self.user_agents: set[str] = set()
        self.max_in_flight: collections.Counter[str] = collections.Counter()
        self._in_flight: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> ImageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                server.hits[self.path] += 1
                server.user_agents.add(self.headers.get("User-Agent", ""))
                kind, _, arg = urlsplit(self.path).path.lstrip("/").partition("/")
                with server._lock:
                    server._in_flight[self.path] += 1
                    most = max(server.max_in_flight[self.path], server._in_flight[self.path])
                    server.max_in_flight[self.path] = most
                self._held = True
                try:
                    self._route(kind, arg)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeouts are the point of some routes)
                finally:
                    self._answered()

            def _answered(self) -> None:
                if self._held:
                    self._held = False
                    with server._lock:
                        server._in_flight[self.path] -= 1

            def _route(self, kind: str, arg: str) -> None:
                if kind == "images":
                    time.sleep(server.delay_s)
                    if arg in server.hold:
                        server.released.wait(60)
                    self._file(server.root / arg)
                elif kind == "status":
                    self._send(int(arg), b"")
                elif kind == "slow":
                    time.sleep(float(arg))
                    self._send(200, b"late")
                elif kind == "late":
                    seconds, _, name = arg.partition("/")
                    time.sleep(float(seconds))
                    self._file(server.root / name)
                elif kind == "drop":
                    self._answered()
                    self.close_connection = True  # the server closes the socket unanswered
                elif kind == "drip":
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    for _ in range(150):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.2)
                elif kind in ("redirect", "loop"):
                    self.send_response(302)
                    self.send_header(
                        "Location", f"/images/{arg}" if kind == "redirect" else "/loop"
                    )
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif kind == "robots":
                    tag, _, name = arg.partition("/")
                    self._send(
                        200, (server.root / name).read_bytes(), {"X-Robots-Tag": unquote(tag)}
                    )
                elif kind == "busy" and server.hits[self.path] == 1:
                    self._send(429, b"slow down", {"Retry-After": arg.partition("/")[0]})
                elif kind == "busy":
                    self._file(server.root / arg.partition("/")[2])
                elif kind == "flaky":
                    if server.hits[self.path] == 1:
                        self._send(503, b"try again")
                    else:
                        self._file(server.root / arg)
                else:
                    self._send(404, b"no such route")

            def _file(self, path: Path) -> None:
                if path.is_file():
                    self._send(200, path.read_bytes())
                else:
                    self._send(404, b"not found")

            def _send(self, code: int, body: bytes, headers: dict | None = None) -> None:
                self._answered()
                self.send_response(code)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler


class Server:
    """A real server process on 127.0.0.1: started on ``with``, ready once ``ready()`` holds,
    stopped (SIGTERM, then SIGKILL) on exit. Its output goes to ``workdir/NAME.log``."""

    name = "server"

    def __init__(self, workdir: Path) -> None:
        self.workdir, self.port = Path(workdir), free_port()
        self._proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def ready(self) -> bool:
        raise NotImplementedError

    def __enter__(self):
        self.workdir.mkdir(parents=True, exist_ok=True)
        log_path = self.workdir / f"{self.name}.log"
        log = open(log_path, "wb")  # noqa: SIM115 - lives with the process
        self._proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env()
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {log_path.read_text()[-3000:]}")
            try:
                if self.ready():
                    return self
            except (requests.ConnectionError, OSError):
                pass
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"{self.name} did not start in 90 s")

    def __exit__(self, *exc: object) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()


class MlflowServer(Server):
    """A real ``mlflow server`` on 127.0.0.1, lean settings: SQLite + local artifacts, or the
    given backend store and artifact destination (with ``extra_env``, e.g. S3 settings)."""

    name = "mlflow"

    def __init__(
        self, workdir: Path, backend: str | None = None, artifacts: str | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(workdir)
        self.url = f"http://127.0.0.1:{self.port}"
        self.backend = backend or f"sqlite:///{self.workdir / 'mlflow.db'}"
        self.artifacts = artifacts or str(self.workdir / "artifacts")
        self.extra_env = extra_env or {}

    def command(self) -> list[str]:
        return mlflow_server(self.port, self.backend, self.artifacts)[0]

    def env(self) -> dict[str, str]:
        return mlflow_server(self.port, self.backend, self.artifacts)[1] | self.extra_env

    def ready(self) -> bool:
        return requests.get(f"{self.url}/health", timeout=1).ok


if __name__ == "__main__":  # python -m pipelines.local ROOT PORT: a standalone image host
    ImageServer(Path(sys.argv[1]), port=int(sys.argv[2])).serve_forever()
