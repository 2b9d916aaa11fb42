"""Stop one Ray cluster of this machine, the one whose GCS listens on PORT, and leave the
user's other Ray clusters and jobs running (`ray stop` ends every Ray process of the user's).

    python cluster/stop.py PORT

A cluster's processes are found by its session: the GCS server's command line names its port
and the session (`session_<date>_<pid>`), which every node's raylet, log monitor, dashboard
and autoscaler monitor name too (the Ray client server names the GCS address instead); their
children (workers, agents, job drivers, Serve replicas) go with them. Raylets first, the GCS
last, as `ray stop` does, each group SIGTERMed and SIGKILLed after a grace period. Prints what
it stopped; exit 0 also when nothing was running. Needs only psutil (a Ray dependency).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

import psutil

GRACE_S = 5.0


def cluster_processes(port: int) -> list[psutil.Process]:
    """The cluster's processes and their descendants."""
    table = []
    for proc in psutil.process_iter(["cmdline"]):
        table.append((proc, " ".join(proc.info["cmdline"] or [])))
    session = next(
        (m.group(0) for _, cmd in table if f"--gcs_server_port={port}" in cmd.split()
         for m in [re.search(r"session_[0-9_-]+", cmd)] if m),
        None,
    )  # fmt: skip
    if session is None:
        return []
    client = re.compile(rf"ray\.util\.client\.server .*--address=\S+:{port}(\s|$)")
    roots = [p for p, cmd in table if session in cmd or client.search(cmd)]
    found: dict[int, psutil.Process] = {}
    for proc in roots:
        found.setdefault(proc.pid, proc)
        for child in _children(proc):
            found.setdefault(child.pid, child)
    return list(found.values())


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return ""


def terminate(procs: list[psutil.Process], grace_s: float = GRACE_S) -> None:
    """SIGTERM the processes, SIGKILL those left after ``grace_s``; returns once they have
    exited."""
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=2)


def stop(port: int) -> int:
    """Stop the cluster on ``port``; returns how many processes were found."""
    procs = cluster_processes(port)
    order = {"raylet": 0, "gcs_server": 2}  # raylets first, the GCS last; the rest between
    groups: list[list[psutil.Process]] = [[], [], []]
    for proc in procs:
        groups[order.get(_name(proc), 1)].append(proc)
    for group in groups:
        terminate(group)
    # `ray.init(address="auto")` reads the last started cluster's address from this file.
    current = Path(
        os.environ.get("RAY_TMPDIR") or tempfile.gettempdir(), "ray", "ray_current_cluster"
    )
    try:
        if current.read_text().strip().endswith(f":{port}"):
            current.unlink()
    except OSError:
        pass
    return len(procs)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit(__doc__.split("\n\n")[1].strip())
    n = stop(int(sys.argv[1]))
    print(f"stopped {n} processes of the Ray cluster on port {sys.argv[1]}" if n else
          f"no Ray cluster on port {sys.argv[1]}")  # fmt: skip
