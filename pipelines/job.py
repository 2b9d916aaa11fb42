"""What every mmray job does the same way, from its ``main``:

- stdout carries one JSON line, the job's result; logs and progress go to stderr (so
  ``mmray train ... | tail -1 | jq`` works), and so does anything Ray forwards from workers;
- a bad config or a reference that does not resolve exits 2 with a message, before Ray starts;
- Ray: the cluster named by ``--address``/``RAY_ADDRESS`` or found running on this machine
  is joined, and the job fails at once if its actors cannot fit there; with none to join,
  the job starts a local Ray sized for itself (its actors plus room for Ray Data's tasks);
- under ``ray job submit`` the working directory is Ray's temporary copy of
  ``--working-dir``: relative output paths and the embedded MLflow store would vanish with
  it, so the job refuses them and says what to set instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import Any, TextIO, TypeVar

import yaml

from mmcore import storage, tracking
from mmcore.config import ConfigError, to_dict
from mmcore.data.shards import shard_tars
from mmcore.tracking import TrackingConfig

log = logging.getLogger(__name__)
T = TypeVar("T")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Ray keeps an idle worker process past num_cpus for 1 s only. A training job's actors
# (controller, workers, Ray Data's coordinators) are already past it, so every dataset and
# every evaluation started fresh task processes: 20-30 s of a short run on 2 cores. Idle
# workers of a local Ray stay 10 minutes (cluster/local.sh sets the same). Read-only: ray.init
# writes its session's spill folder into the dict it is given, so pass a copy.
RAY_SYSTEM_CONFIG = MappingProxyType({"idle_worker_killing_time_threshold_ms": 600_000})


@functools.cache  # one filter per prefix: adding it again to a logger adds nothing
def _not_starting_with(prefix: str) -> Callable[[logging.LogRecord], bool]:
    return lambda record: not record.getMessage().startswith(prefix)


def drop_log_lines(logger: str, prefix: str) -> None:
    """Drop ``logger``'s records whose message starts with ``prefix``: notices Ray prints on
    every start that tell a user of the job nothing."""
    logging.getLogger(logger).addFilter(_not_starting_with(prefix))


@dataclasses.dataclass(frozen=True)
class Need:
    """What a job reserves in Ray at once."""

    cpus: float  # CPUs its actors hold (training workers, trials, replicas)
    gpus: float = 0.0
    data_cpus: float = 0.0  # CPUs that must stay free for Ray Data tasks beside them
    # A local Ray started for the job serves the dashboard: Ray Train frees a finished
    # trial's placement group through the State API it serves. Without it (a Ray Data job)
    # a short job starts ~2 s sooner and saves ~4 CPU-s.
    dashboard: bool = True

    def describe(self) -> str:
        parts = [f"{self.cpus:g} CPU"] + [f"{self.gpus:g} GPU"] * bool(self.gpus)
        if self.data_cpus:
            parts.append(f"at least 1 more CPU for Ray Data's tasks ({self.data_cpus:g} preferred)")
        return " + ".join(parts)


def main(
    prog: str, parse: Callable[[], T], work: Callable[[T], dict[str, Any]],
    check: Callable[[T], None] = lambda cfg: None,
    need: Callable[[T], Need | None] = lambda cfg: None,
    address: str | None = None, log_to_driver: bool = True,
) -> int:  # fmt: skip
    """Run a job: ``parse`` the command line into a config, ``check`` its references, start or
    join Ray for ``need`` (None: no Ray), run ``work`` and print its result as the one JSON
    line on stdout. Exit 2 for a bad config or reference, with the message on stderr."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    with contextlib.ExitStack() as stack:
        out = _result_stream(stack)
        try:
            cfg = parse()
            check(cfg)
        except ValueError as e:  # ConfigError, or a check of the values (a bad config)
            return refuse(prog, e)
        if dataclasses.is_dataclass(cfg):
            log.info("%s, resolved config:\n%s", prog, config_yaml(cfg).rstrip())
        if isinstance(getattr(cfg, "tracking", None), TrackingConfig):
            tracking.warm_up(cfg.tracking)  # beside Ray's start-up
        try:
            if (needed := need(cfg)) is not None:
                init_ray(needed, address, log_to_driver)
                _sigterm_interrupts()
            result = work(cfg)
        except ConfigError as e:
            return refuse(prog, e)
        except KeyboardInterrupt:  # Ctrl-C: a line, not a traceback; the stack stops Ray
            print(f"{prog}: interrupted", file=sys.stderr, flush=True)
            return 130
        print(json.dumps(result), file=out, flush=True)
    return 0


def _sigterm_interrupts() -> None:
    """SIGTERM (kill, a pod stopping) as Ctrl-C: "interrupted", Ray stopped, exit 130. Set
    after ``ray.init``, whose own handler printed a stack dump and aborted the process
    (exit 134), leaving a local cluster's processes behind."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def config_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def write_config(cfg: Any, folder: str) -> str:
    """The resolved config as ``folder/config.yaml``, beside a job's outputs (where MLflow
    keeps it as the run's params when tracking is on); it loads back with ``--config``."""
    storage.write_text(path := storage.join(folder, "config.yaml"), config_yaml(cfg))
    return path


def _result_stream(stack: contextlib.ExitStack) -> TextIO:
    """Where the JSON line goes; everything else bound for stdout goes to stderr. In a real
    process that is done on file descriptor 1, for good: Ray's log monitor prints workers'
    output from a thread, some of it after the job returns, and C code and subprocesses
    write to the descriptor. Where a caller captured stdout (tests), in Python."""
    stdout = sys.stdout
    stack.enter_context(contextlib.redirect_stdout(sys.stderr))
    if stdout is None or stdout is not sys.__stdout__:
        return stdout
    stdout.flush()
    result = os.fdopen(os.dup(stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), stdout.fileno())
    return result


def refuse(prog: str, error: Exception) -> int:
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2


# --- Ray --------------------------------------------------------------------------------------


def init_ray(need: Need, address: str | None = None, log_to_driver: bool = True) -> None:
    """Join the cluster to use, or start a local one sized for ``need``; then check it fits."""
    import ray

    if not ray.is_initialized():
        from ray._private.services import canonicalize_bootstrap_address

        # The same search ray.init() makes: RAY_ADDRESS, then a cluster running here.
        if address or canonicalize_bootstrap_address(None) is not None:
            ray.init(address=address, log_to_driver=log_to_driver)
        else:
            # Logical CPUs past the physical ones: a 2-core machine still runs 2 training
            # workers with Ray Data's tasks beside them (with exactly 2 the read never ran).
            cpus = max(os.cpu_count() or 1, math.ceil(need.cpus + need.data_cpus))
            hint = "" if need.dashboard else (
                " without a dashboard (for one, `ray start --head` first: the job joins it)"
            )  # fmt: skip
            log.info("starting a local Ray for this job: %d logical CPUs%s", cpus, hint)
            # Ray 2.60 turns token auth on for each local cluster ray.init starts and warns
            # so every time: the job keeps it on (`ray job submit` needs the token).
            drop_log_lines("ray._private.authentication.authentication_token_setup",
                           "Token authentication is enabled")  # fmt: skip
            ray.init(
                num_cpus=cpus, log_to_driver=log_to_driver,
                include_dashboard=None if need.dashboard else False,  # None: Ray's default
                # Ray starts at most min(cores, num_cpus) worker processes at once and warns
                # at 4× that: a training job's 8 processes on 2 cores said "4x the maximum
                # expected startup concurrency", though it asked for those 4 logical CPUs.
                _system_config=dict(RAY_SYSTEM_CONFIG, worker_maximum_startup_concurrency=cpus),
            )  # fmt: skip
    fits(need, capacity())


def capacity() -> dict[str, float]:
    """What the cluster can hold: where an autoscaler scales it (KubeRay, the launcher), the
    most its node groups may reach, as Ray Train checks it; otherwise its live nodes."""
    import ray
    from ray._private.state import state

    return state.get_max_resources_from_cluster_config() or ray.cluster_resources()


def fits(need: Need, resources: dict[str, float]) -> None:
    """ConfigError unless a cluster with ``resources`` can run ``need`` at once."""
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if cpus >= need.cpus + min(need.data_cpus, 1.0) and gpus >= need.gpus:
        return
    raise ConfigError(
        f"the Ray cluster has {cpus:g} CPU and {gpus:g} GPU; this job needs {need.describe()}. "
        "Ask for less (scaling.num_workers, scaling.cpus_per_worker, max_concurrent_trials, "
        "replicas.*) or give Ray more (`ray start --num-cpus N`, more nodes)"
    )


# --- references checked before any work -----------------------------------------------------


def in_ray_job() -> bool:
    """True in the driver of a ``ray job submit``: its working directory is Ray's."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def check_output(key: str, path: str) -> None:
    """An output folder that is a file; under a Ray job, a relative output path, which would
    land in Ray's temporary copy of the working directory and vanish with the job."""
    if path and in_ray_job() and "://" not in path and not Path(path).is_absolute():
        raise ConfigError(
            f"{key}={path!r} is relative: under `ray job submit` it would be written into the "
            "job's temporary copy of --working-dir and vanish with it; give an absolute path "
            "on storage every node can write"
        )
    if path and "://" not in path and Path(path).is_file():
        raise ConfigError(f"{key}: {Path(path).absolute()} is a file; give a folder")


def output_root(path: str) -> str:
    """Where a job writes checkpoints and exports: ``path`` (absolute, or a URI), or without
    one Ray's default ``~/ray_results`` (outside the source tree, which ``ray job submit``
    uploads)."""
    return storage.absolute(path or "~/ray_results")


def check_input(key: str, path: str) -> None:
    """An input path that does not exist or cannot be read (a missing bucket or prefix,
    credentials the store refuses), with the hint a Ray job needs."""
    if storage.is_uri(path):
        storage.check_readable(key, path)
        return
    if Path(path).exists():
        return
    hint = ""
    if in_ray_job() and not Path(path).is_absolute():
        hint = (
            " (under `ray job submit`, relative paths resolve in the job's copy of "
            "--working-dir, which leaves out what .gitignore lists, such as data/: give an "
            "absolute path)"
        )
    raise ConfigError(f"{key}: {Path(path).absolute()} does not exist{hint}")


def shard_paths(path: str, key: str = "data.path") -> list[str]:
    """The curated ``.tar`` shards in folder (or bucket prefix) ``path``, or the one ``.tar``
    it names, as absolute paths or URIs; a clear error when there are none."""
    check_input(key, path)
    try:
        return shard_tars(storage.absolute(path))
    except ConfigError as e:
        raise ConfigError(f"{e} (on a cluster: a path every node can read)") from None


def check_tracking(cfg: TrackingConfig) -> None:
    """Under a Ray job the embedded MLflow store would vanish with the working directory."""
    if cfg.enabled and in_ray_job() and not os.environ.get("MLFLOW_TRACKING_URI"):
        raise ConfigError(
            "running under `ray job submit` without MLFLOW_TRACKING_URI: the embedded MLflow "
            "store would be written into the job's temporary working directory and vanish "
            "with it. Pass a durable store, e.g. --runtime-env-json "
            '\'{"env_vars": {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}}\' '
            "(an MLflow server, or sqlite:////an/absolute/path.db on one machine), or turn "
            "tracking off with tracking.enabled=false"
        )
