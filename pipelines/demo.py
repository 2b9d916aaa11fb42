"""Every stage on one machine: ``mmray demo`` (``make demo``), and ``mmray demo --stop``.

Starts an MLflow server on 127.0.0.1 (SQLite + local artifacts) and a local multi-node Ray
cluster (``cluster/local.sh``), writes a sample crawl, then submits each stage as a Ray job:
curate → train (tiny) → tune (a fusion × loss sweep that crowns a champion) → serve the
champion. It sends real requests, prints the URLs and a summary table, and leaves the
services running until ``mmray demo --stop``. Logs of every job: WORKDIR/logs/.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import psutil
import requests

from pipelines.flags import SOURCE as ROOT
from pipelines.local import mlflow_server, port_in_use
from pipelines.progress import Follow
from pipelines.report import Report, render

LOCAL_CLUSTER = ROOT / "cluster" / "local.sh"
CLUSTER_STOP = ROOT / "cluster" / "stop.py"
STATE = "services.json"
EVAL_PAIRS = 300  # held-out pairs the retrieval metrics are measured on
PER_SHAPE = 4  # held-out images of each shape the demo classifies
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")  # terminal control in job logs
# (sample rows, base training steps, each sweep trial's samples): the full demo (the tiny
# recipe's 1500 steps on an 8000-row crawl, then two 80-step fine-tunes of it), and --quick
# for tests.
SIZES = {"full": (8000, 1500, 80 * 64), "quick": (200, 8, 4 * 64)}


class StageFailed(RuntimeError):
    pass


def say(text: str) -> None:
    print(text, flush=True)


def start_mlflow(workdir: Path, port: int) -> tuple[int, str]:
    store = workdir / "mlflow"
    store.mkdir(parents=True, exist_ok=True)
    cmd, env = mlflow_server(port, f"sqlite:///{store / 'mlflow.db'}", str(store / "artifacts"))
    with open(store / "server.log", "ab") as log:  # the server outlives this process
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_for(f"{url}/health", 90, f"the MLflow server (log: {store / 'server.log'})", proc)
    return proc.pid, url


def wait_for(url: str, timeout_s: float, what: str, proc=None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StageFailed(f"{what} exited")
        try:
            if requests.get(url, timeout=5).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise StageFailed(f"{what} did not answer on {url} within {timeout_s:.0f} s")


def cluster(command: str, dashboard_port: int, gcs_port: int) -> None:
    # Logical CPUs beyond the 2 physical ones: the training workers, Ray Data and the sweep's
    # trial process run side by side.
    env = os.environ | {"DASHBOARD_PORT": str(dashboard_port), "GCS_PORT": str(gcs_port),
                        "HEAD_CPUS": "2", "WORKER_CPUS": "2"}  # fmt: skip
    run = subprocess.run([str(LOCAL_CLUSTER), command], env=env, text=True, capture_output=True)
    for line in (run.stdout + run.stderr).strip().splitlines():
        say(f"    {line}")
    if run.returncode and command == "up":
        raise StageFailed(f"cluster/local.sh up failed ({run.returncode})")


def auth_headers() -> dict[str, str]:
    """The token of the cluster (cluster/local.sh keeps Ray's token auth), as the job SDK
    sends it with RAY_AUTH_MODE=token. (Setting that variable here would be too late: Ray
    reads it once, when it is imported.)"""
    ray = Path(sys.executable).with_name("ray")
    token = subprocess.run([str(ray), "get-auth-token"], capture_output=True, text=True,
                           check=True).stdout.strip()  # fmt: skip
    return {"Authorization": f"Bearer {token}"}


def run_job(client, stage: str, entrypoint: str, workdir: Path, env: dict[str, str]) -> dict:
    """Submit one stage as a Ray job, show its progress (the ``progress:`` lines its log
    gets, ``pipelines.progress``; a sweep's also those of the trial training), and return
    the JSON line it printed last; ``StageFailed`` (with the log's tail and path) unless the
    job succeeded. The whole log is kept in WORKDIR/logs/STAGE.log."""
    from ray.job_submission import JobStatus

    job = client.submit_job(
        entrypoint=entrypoint,
        runtime_env={"working_dir": str(ROOT), "env_vars": env,
                     "excludes": [".venv*", ".demo", ".cache", "bench/out", "mlruns", ".git"]},
    )  # fmt: skip
    say(f"    job {job}: {entrypoint}")
    t0, follow = time.monotonic(), Follow((stage, "train") if stage == "tune" else (stage,))
    ended = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)
    try:
        while (status := client.get_job_status(job)) not in ended:
            time.sleep(2)
            follow.update(ANSI.sub("", client.get_job_logs(job)))
    except KeyboardInterrupt:  # Ctrl-C: the stage's job stops too (the cluster keeps running)
        follow.close()
        client.stop_job(job)
        raise
    logs = ANSI.sub("", client.get_job_logs(job))
    follow.update(logs)
    follow.close()
    path = workdir / "logs" / f"{stage}.log"
    path.parent.mkdir(exist_ok=True)
    path.write_text(logs)
    if status != JobStatus.SUCCEEDED:
        tail = "\n".join(logs.splitlines()[-15:])
        raise StageFailed(f"the {stage} job {status.value.lower()} (log: {path}): {tail}")
    say(f"    {stage} succeeded in {time.monotonic() - t0:.0f} s")
    return last_json(logs)


def last_json(logs: str) -> dict:
    """The last JSON object printed in a job's logs (a job ends with one JSON line; Ray's
    progress output may share its line)."""
    for line in reversed(logs.splitlines()):
        start = line.find('{"')
        while start != -1:
            try:
                return json.loads(line[start:])
            except ValueError:
                start = line.find('{"', start + 1)
    return {}


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    res = requests.post(url, json=body, timeout=30)
    res.raise_for_status()
    return res.json()


def requests_demo(url: str, workdir: Path) -> dict[str, Any]:
    """The page's requests, for real: held-out images of each shape (colour × shape
    compositions the crawl never had) classified among the shape names, with their latency,
    and a search for a shape."""
    import base64

    folder = workdir / "raw" / "zeroshot" / "shape"
    labels = sorted(p.name for p in folder.iterdir())
    images = [(s, base64.b64encode(p.read_bytes()).decode())
              for s in labels for p in sorted((folder / s).glob("*.png"))[:PER_SHAPE]]  # fmt: skip
    answers, latencies = [], []
    for truth, image in images:
        t0 = time.perf_counter()
        top = post(f"{url}/v1/classify", {"image": image, "labels": labels})["labels"][0]
        latencies.append(1000 * (time.perf_counter() - t0))
        answers.append({"image": f"data:image/png;base64,{image}", "truth": truth,
                        "answer": top["label"]})  # fmt: skip
    right = sum(a["truth"] == a["answer"] for a in answers)
    say(f"    classify {len(answers)} held-out images among {labels}: {right} right")
    query, shape = "a circle", "circle"
    hits = post(f"{url}/v1/search", {"text": query, "k": 5})["hits"]
    say(f"    search {query!r}: {[h['caption'] for h in hits]}")
    return {
        "classify_right": right, "classify_of": len(answers),
        "search_query": query, "search_hits_with_shape": sum(shape in h["caption"] for h in hits),
        "search_hits": len(hits), "p50": float(np.percentile(latencies, 50)),
        "p95": float(np.percentile(latencies, 95)),
        "classify": answers, "hits": hits,  # for the report
    }  # fmt: skip


def write_report(
    workdir: Path, mlflow_url: str, summary: dict[str, Any], answers: dict[str, Any],
    status_counts: dict[str, int], table: list[tuple[str, str]],
) -> Path:  # fmt: skip
    """WORKDIR/report.html: the training run's curves and the sweep's plots from MLflow, the
    curation counts and the served model's answers."""
    import mlflow

    import mmcore.tracking  # noqa: F401 - no download progress bars in the demo's output

    client = mlflow.MlflowClient(mlflow_url)
    curves = {
        name: [(m.step, m.value) for m in client.get_metric_history(summary["train_run"], name)]
        for name in ("train/loss", "eval/zeroshot/shape/top1", "eval/zeroshot/colour/top1",
                     "eval/retrieval/i2t_r5")
    }  # fmt: skip
    plots = Path(mlflow.artifacts.download_artifacts(
        run_id=summary["sweep_run"], artifact_path="plots", tracking_uri=mlflow_url,
        dst_path=str(workdir)))  # fmt: skip
    report = Report(
        table=table, status_counts=status_counts, curves=curves,
        ablation=[p.read_bytes() for p in sorted(plots.glob("*.png"))],
        classify=answers["classify"], search_query=answers["search_query"],
        search_hits=answers["hits"],
    )  # fmt: skip
    path = workdir / "report.html"
    path.write_text(render(report))
    return path


def demo(args: argparse.Namespace) -> dict[str, Any]:
    from ray.job_submission import JobSubmissionClient

    from mmcore.data.sample import make_sample_data

    # Not the job SDK's upload chatter (its loggers set INFO themselves), nor the note on
    # every submission that .git and .venv are left out of the working directory.
    for name in ["ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"]:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    rows, steps, samples = SIZES["quick" if args.quick else "full"]
    t_start = time.monotonic()
    # The crawl is drawn while the services start (both take tens of seconds).
    crawl = ThreadPoolExecutor(1).submit(make_sample_data, workdir / "raw", n=rows, seed=0)
    say(f"[1/7] MLflow server on 127.0.0.1:{args.mlflow_port} (SQLite + local artifacts)")
    pid, mlflow_url = start_mlflow(workdir, args.mlflow_port)
    dashboard = f"http://127.0.0.1:{args.dashboard_port}"
    serve_url = f"http://127.0.0.1:{args.serve_port}"
    ports = {"dashboard_port": args.dashboard_port, "gcs_port": args.gcs_port}
    (workdir / STATE).write_text(json.dumps({"mlflow_pid": pid} | ports))
    say("[2/7] local Ray cluster: a head node and a worker node (cluster/local.sh up)")
    cluster("up", **ports)
    client = JobSubmissionClient(dashboard, headers=auth_headers())
    env = {"MLFLOW_TRACKING_URI": mlflow_url, "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_DISABLE_TELEMETRY": "true",
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}  # readable job logs  # fmt: skip
    say(f"[3/7] sample crawl: {rows} rows → {workdir / 'raw'}")
    crawl.result()
    raw, shards = workdir / "raw", workdir / "shards"
    zeroshot = f"--zeroshot {raw}/zeroshot/colour --zeroshot {raw}/zeroshot/shape"
    jobs = {
        "curate": f"python -m pipelines.curate --config pipelines/configs/curate_tiny.yaml "
                  f"--input {raw}/metadata.parquet --output {shards}",
        "train": f"python -m pipelines.train --config pipelines/configs/train/tiny.yaml "
                 f"--data {shards} {zeroshot} schedule.max_steps={steps} "
                 f"schedule.checkpoint_every={steps} eval.every={max(1, steps // 3)} "
                 f"eval.max_pairs={EVAL_PAIRS} output={workdir}/runs",
        "tune": f"python -m pipelines.tune --config pipelines/configs/tune/demo.yaml "
                f"--data {shards} {zeroshot} samples_per_trial={samples} "
                f"output={workdir}/sweeps",  # + the trained model, below
        "serve": f"python -m pipelines.serve --detach --model models:/mmray-tiny@champion "
                 f"--index {shards} --port {args.serve_port}",
    }  # fmt: skip
    say("[4/7] curate (Ray job)")
    curated = run_job(client, "curate", jobs["curate"], workdir, env)
    say(f"[5/7] train the tiny config, {steps} steps (Ray job: Ray Train + DeepSpeed ZeRO-2)")
    trained = run_job(client, "train", jobs["train"], workdir, env)
    say("[6/7] tune: a loss sweep warm-started from it, crowning the champion (Ray job)")
    warm = f" trial.init.from={trained['model_uri']}"  # every trial fine-tunes the trained model
    tuned = run_job(client, "tune", jobs["tune"] + warm, workdir, env)
    say(f"[7/7] serve models:/mmray-tiny@champion on {serve_url} (Ray job, then requests)")
    run_job(client, "serve", jobs["serve"], workdir, env)
    wait_for(f"{serve_url}/healthz", 180, "the Serve app")
    answers = requests_demo(serve_url, workdir)
    info = requests.get(f"{serve_url}/v1/model", timeout=30).json()
    metrics = trained.get("metrics", {})
    summary = {
        "samples_kept": curated["status_counts"].get("success", 0),
        "samples_in": sum(curated["status_counts"].values()),
        "train_run": trained["run_id"],
        "train_metrics": {k: v for k, v in metrics.items() if k.startswith("eval/")},
        "sweep_run": tuned["run_id"], "trials": tuned["trials"],
        "champion": f"models:/{info['name']}/{info['version']}", "champion_fusion": info["fusion"],
        "crowned": tuned["crowned"],
        "champion_metrics": info["metrics"],
        **{k: answers[k] for k in ("classify_right", "classify_of", "search_query",
                                   "search_hits_with_shape", "search_hits")},
        "classify_ms_p50": round(answers["p50"], 1), "classify_ms_p95": round(answers["p95"], 1),
        "minutes": round((time.monotonic() - t_start) / 60, 1),
        "mlflow": mlflow_url, "dashboard": dashboard, "serve": serve_url,
        "report": str(workdir / "report.html"),
    }  # fmt: skip
    table = summary_rows(summary)
    write_report(workdir, mlflow_url, summary, answers, curated["status_counts"], table)
    print_summary(summary, table)
    return summary


def key_metric(name: str) -> bool:
    return name.endswith(("top1", "_r5"))  # the table shows these; the JSON line has all


def summary_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("samples kept", f"{s['samples_kept']} of {s['samples_in']} input rows"),
        *[(f"train {k}", f"{v:.3f}") for k, v in s["train_metrics"].items() if key_metric(k)],
        ("sweep", f"{s['trials']} trials (MLflow run {s['sweep_run']})"),
        ("champion", f"{s['champion']} ({s['champion_fusion']}; crowned: {s['crowned']})"),
        *[(f"champion {k}", f"{v:.3f}") for k, v in s["champion_metrics"].items()
          if key_metric(k)],
        ("classify", f"{s['classify_right']} of {s['classify_of']} held-out shapes right"),
        ("search", f"{s['search_hits_with_shape']} of the top {s['search_hits']} for "
                   f"{s['search_query']!r} have that shape"),
        ("classify latency", f"p50 {s['classify_ms_p50']} ms, p95 {s['classify_ms_p95']} ms"),
        ("wall time", f"{s['minutes']} min"),
        ("MLflow UI", s["mlflow"]), ("Ray dashboard", s["dashboard"]),
        ("Serve", f"{s['serve']}/  (API docs: {s['serve']}/docs)"),
        ("report", s["report"]),
    ]  # fmt: skip


def print_summary(s: dict[str, Any], rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    say("\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows))
    say("\nThe services keep running; stop them with: mmray demo --stop")
    print(json.dumps(s), flush=True)


def stop(workdir: Path) -> int:
    """Stop what ``mmray demo`` left running: the Ray cluster (Serve in it) and MLflow."""
    state_file = workdir.resolve() / STATE
    if not state_file.exists():
        say(f"nothing to stop: no {state_file}")
        return 0
    state = json.loads(state_file.read_text())
    cluster("down", state["dashboard_port"], state["gcs_port"])
    if stop_session(state["mlflow_pid"]):  # the server and its workers
        say(f"stopped the MLflow server (pid {state['mlflow_pid']})")
    state_file.unlink()
    return 0


def stop_session(pgid: int, grace_s: float = 10.0) -> bool:
    """Stop the processes of a server started in a session of its own, and return once they
    have exited (cluster/stop.py's ``terminate``), so that its port is free; False when none
    was running."""
    procs = [p for p in psutil.process_iter() if _pgid(p.pid) == pgid]
    cluster_stop().terminate(procs, grace_s)
    return bool(procs)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def cluster_stop() -> ModuleType:
    """cluster/stop.py, a script on its own (it needs only psutil), as a module."""
    spec = importlib.util.spec_from_file_location("cluster_stop", CLUSTER_STOP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mmray demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--stop", action="store_true", help="stop the services a demo left running")
    p.add_argument("--workdir", default=".demo", help="data, stores and logs (default .demo)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run (tests)")
    p.add_argument("--mlflow-port", type=int, default=5000)
    p.add_argument("--dashboard-port", type=int, default=8265)
    p.add_argument("--gcs-port", type=int, default=6380)
    p.add_argument("--serve-port", type=int, default=8000)
    args = p.parse_args(argv)
    # Before anything starts: a taken port failed the stage that needed it, Serve's after
    # the whole run.
    for name in [] if args.stop else ["mlflow", "dashboard", "gcs", "serve"]:
        if port_in_use(port := getattr(args, f"{name}_port")):
            p.error(
                f"port {port} (--{name}-port) is in use: by a demo still running "
                f"(mmray demo --stop) or another server; give a free one with --{name}-port"
            )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.stop:
        return stop(Path(args.workdir))
    try:
        demo(args)
    except (StageFailed, requests.RequestException, OSError, KeyboardInterrupt) as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        print(f"mmray demo: {'interrupted' if interrupted else f'error: {e}'}", file=sys.stderr)
        print("the services started so far keep running: mmray demo --stop", file=sys.stderr)
        return 130 if interrupted else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
