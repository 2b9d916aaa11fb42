"""Ablation sweeps: fusion × loss (× continuous hyperparameters × seeds) at fixed compute.

    mmray tune --config pipelines/configs/tune/tiny.yaml --data SHARDS [--zeroshot DIR] [k=v]
    mmray tune report SWEEP_RUN_ID          # the ablation table, from MLflow

Each trial is the training job (``pipelines.train.run``) launched from a Tune trial, Ray's
Train-in-Tune pattern: the trial function builds a ``TorchTrainer`` whose reports reach Tune
through ``TuneReportCallback``. Every trial gets the same samples-seen budget. ASHA stops
weak trials at evaluation steps. MLflow gets a parent run per sweep with the ablation
table, plots and search space, and a child run per trial. The best finished trial's model
is registered; alias ``champion`` moves to it only if it beats the current champion on the
same metric. Running the same sweep (``name``) again restores it: finished trials are kept.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Literal

from mmcore.config import apply_overrides, flatten, from_dict, load_config, to_dict
from mmcore.losses.fusion import check_objectives
from mmcore.models.model import OBJECTIVES
from mmcore.tracking import TrackingConfig, tracking_uri
from pipelines import job
from pipelines.train import TrainConfig, add_data_flags, data_overrides
from pipelines.train import check as train_check
from pipelines.train import need as train_need
from pipelines.train import run as train_run

log = logging.getLogger(__name__)
SWEEP_TAG, TRIAL_TAG = "mmray.sweep", "mmray.trial"
DRIVER_CPUS = 0.1  # a trial's own process only launches its Ray Train run
DISTRIBUTIONS = ("uniform", "loguniform", "choice")


@dataclasses.dataclass(kw_only=True)
class SpaceConfig:
    fusion: list[str] = dataclasses.field(default_factory=lambda: ["late", "hybrid"])
    # Loss-term sets; a cell runs only where the fusion variant supports every term.
    loss: list[dict[str, float]] = dataclasses.field(
        default_factory=lambda: [{"clip": 1.0}, {"siglip": 1.0}]
    )
    # Continuous/choice keys, same dotted names as the training config, e.g.
    # optim.lr: {loguniform: [3.0e-4, 3.0e-3]}; drawn at random per trial.
    sample: dict[str, dict[str, list]] = dataclasses.field(default_factory=dict)
    num_samples: int = 1  # random draws per (fusion, loss, seed) cell
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])

    def validate(self) -> None:
        for key, dist in self.sample.items():
            if len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
                raise ValueError(f"space.sample.{key}: one of {DISTRIBUTIONS} with its arguments")
        if not self.cells():
            raise ValueError("space: no fusion × loss cell is valid")

    def cells(self) -> list[dict[str, Any]]:
        """The valid (fusion, loss terms) pairs."""
        out = []
        for fusion in self.fusion:
            if fusion not in OBJECTIVES:
                raise ValueError(f"space.fusion: unknown variant {fusion!r}")
            for terms in self.loss:
                try:
                    check_objectives(fusion, terms)
                except ValueError:
                    continue
                out.append({"model.fusion": fusion, "loss.terms": terms})
        return out


@dataclasses.dataclass(kw_only=True)
class AshaConfig:
    enabled: bool = True
    grace_evals: int = 2  # evaluations every trial gets before it may be stopped
    reduction_factor: int = 2


@dataclasses.dataclass(kw_only=True)
class SweepConfig:
    name: str = "sweep"  # the same name again restores the sweep
    train: str = "pipelines/configs/train/tiny.yaml"  # the trials' base training config
    overrides: list[str] = dataclasses.field(default_factory=list)  # key=value for every trial
    space: SpaceConfig = dataclasses.field(default_factory=SpaceConfig)
    metric: str = "eval/retrieval/i2t_r5"
    mode: Literal["max", "min"] = "max"
    samples_per_trial: int = 19_200  # fixed compute: every trial sees this many samples
    max_concurrent_trials: int = 1
    asha: AshaConfig = dataclasses.field(default_factory=AshaConfig)
    registered_model: str = "mmray"
    output: str = ""  # sweeps and trial checkpoints under output/name; empty: ~/ray_results
    tracking: TrackingConfig = dataclasses.field(
        default_factory=lambda: TrackingConfig(experiment="mmray-tune")
    )

    def validate(self) -> None:
        if not self.metric.startswith("eval/"):
            raise ValueError("metric must be an evaluation metric (eval/...)")
        if self.max_concurrent_trials < 1:
            raise ValueError("max_concurrent_trials must be >= 1")

    def base(self) -> TrainConfig:
        """The trials' common training config, at the fixed samples budget, paths absolute
        (Tune runs each trial in its own working directory)."""
        cfg = load_config(TrainConfig, self.train, self.overrides)
        steps = self.samples_per_trial // cfg.schedule.global_batch
        if steps < 1:
            raise ValueError("samples_per_trial is less than one global batch")
        every = min(cfg.eval.every or steps, steps)
        cfg.schedule.max_steps = steps
        cfg.eval.every = cfg.schedule.checkpoint_every = every  # every report has the metric
        cfg.data.path = str(Path(cfg.data.path).resolve()) if cfg.data.path else ""
        cfg.data.val_path = str(Path(cfg.data.val_path).resolve()) if cfg.data.val_path else ""
        cfg.eval.zeroshot = [str(Path(f).resolve()) for f in cfg.eval.zeroshot]
        cfg.output = str(job.output_root(self.output) / self.name / "trials")
        cfg.tracking = self.tracking
        return cfg


def trial_overrides(config: dict[str, Any]) -> list[str]:
    """A Tune trial's config → key=value overrides of the base training config."""
    flat = dict(config["cell"]) | {"schedule.seed": config["seed"]} | config.get("sample", {})
    return [f"{k}={json.dumps(v)}" for k, v in flat.items()]


def trial_config(config: dict[str, Any]) -> TrainConfig:
    """The trial's training config; a swept batch size keeps the samples budget fixed."""
    cfg = from_dict(TrainConfig, apply_overrides(config["base"], trial_overrides(config)))
    cfg.schedule.max_steps = config["samples_per_trial"] // cfg.schedule.global_batch
    return cfg


def trial_fn(config: dict[str, Any]) -> None:
    """One Tune trial: the training job, nested in the sweep's MLflow run."""
    import os

    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    os.environ["MLFLOW_TRACKING_URI"] = config["tracking_uri"]  # cwd is the trial's folder
    trial_id = ray.tune.get_context().get_trial_id()
    parent = config["parent_run_id"]
    train_run(trial_config(config), run_name=f"trial-{trial_id}", parent_run_id=parent,
              tags={SWEEP_TAG: parent, TRIAL_TAG: trial_id},
              callbacks=[TuneReportCallback()])  # fmt: skip


# --- driver --------------------------------------------------------------------------------


def param_space(sweep: SweepConfig, parent_run_id: str) -> dict:
    from ray import tune

    sample = {}
    for key, dist in sweep.space.sample.items():
        (kind, args), = dist.items()  # fmt: skip
        sample[key] = tune.choice(args) if kind == "choice" else getattr(tune, kind)(*args)
    return {
        "cell": tune.grid_search(sweep.space.cells()),
        "seed": tune.grid_search(sweep.space.seeds),
        "sample": sample,
        "base": to_dict(sweep.base()),
        "samples_per_trial": sweep.samples_per_trial,
        "parent_run_id": parent_run_id,
        "tracking_uri": tracking_uri(),
    }


def _tuner(sweep: SweepConfig, path: Path, space: dict) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    trainable = tune.with_resources(trial_fn, {"CPU": DRIVER_CPUS})
    if tune.Tuner.can_restore(str(path)):
        log.info("restoring sweep %s: finished trials are kept", path)
        return tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    base = sweep.base()
    scheduler = FIFOScheduler()
    if sweep.asha.enabled:
        scheduler = ASHAScheduler(
            # Time is samples seen (batch size may be swept). max_t is past the budget: ASHA
            # stops a trial at max_t, and one that reaches its budget must still export.
            time_attr="train/samples_seen", max_t=sweep.samples_per_trial + 1,
            grace_period=sweep.asha.grace_evals * base.eval.every * base.schedule.global_batch,
            reduction_factor=sweep.asha.reduction_factor,
        )  # fmt: skip
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=sweep.metric, mode=sweep.mode, scheduler=scheduler,
            num_samples=sweep.space.num_samples,
            max_concurrent_trials=sweep.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(name=sweep.name, storage_path=str(path.parent)),
    )  # fmt: skip


def ablation_rows(results: Any, sweep: SweepConfig, models: dict[str, str]) -> list[dict]:
    """One row per trial, best first: its cell, the metric, the compute it used, and the
    model it logged (``models``: trial id → model URI; none if stopped early)."""
    rows = []
    for result in results:
        metrics, config = result.metrics or {}, result.config
        trial_cfg = trial_config(config)
        budget = trial_cfg.schedule.max_steps
        steps = int(metrics.get("step", 0))
        trial = metrics.get("trial_id", Path(result.path).name)
        rows.append({
            "trial": trial,
            "fusion": config["cell"]["model.fusion"],
            "loss": "+".join(config["cell"]["loss.terms"]),
            "seed": config["seed"],
            **config.get("sample", {}),
            sweep.metric: metrics.get(sweep.metric),
            "steps": steps,
            "samples_seen": steps * trial_cfg.schedule.global_batch,
            "status": "finished" if trial in models else "stopped early",
            "steps_saved": budget - steps,
            "model_uri": models.get(trial, ""),
        })  # fmt: skip
    sign = -1 if sweep.mode == "max" else 1
    missing = [r for r in rows if r[sweep.metric] is None]
    scored = sorted((r for r in rows if r[sweep.metric] is not None),
                    key=lambda r: sign * r[sweep.metric])  # fmt: skip
    return scored + missing


def markdown(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plots(results: Any, rows: list[dict[str, Any]], metric: str, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fusions = sorted({r["fusion"] for r in rows})
    losses = sorted({r["loss"] for r in rows})
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(losses)
    for i, loss in enumerate(losses):
        values = []
        for fusion in fusions:
            cell = [r[metric] for r in rows if (r["fusion"], r["loss"]) == (fusion, loss)]
            values.append(max((v for v in cell if v is not None), default=0.0))
        ax.bar([x + i * width for x in range(len(fusions))], values, width, label=loss)
    ax.set_xticks([x + width * (len(losses) - 1) / 2 for x in range(len(fusions))], fusions)
    by_metric = _finish(fig, ax, metric, "best trial per fusion × loss",
                        folder / "metric_by_fusion_loss.png")  # fmt: skip

    fig, ax = plt.subplots(figsize=(6, 4))
    top = {r["trial"] for r in rows[:3]}
    for result in results:
        frame = result.metrics_dataframe
        name = (result.metrics or {}).get("trial_id", Path(result.path).name)
        if name in top and frame is not None and metric in frame:
            points = frame[["step", metric]].dropna()
            ax.plot(points["step"], points[metric], marker="o", label=name)
    ax.set_xlabel("step")
    curves = _finish(fig, ax, metric, "learning curves, top trials",
                     folder / "learning_curves_top.png")  # fmt: skip
    return [by_metric, curves]


def _finish(fig: Any, ax: Any, ylabel: str, title: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def trial_models(parent_run_id: str, errored: set[str]) -> dict[str, str]:
    """Trial id → the model its run logged. Runs of trials that ASHA stopped ended as
    RUNNING or FAILED (the trial was interrupted): they are marked KILLED here."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri())
    models = {}
    for child in client.search_runs(
        [client.get_run(parent_run_id).info.experiment_id],
        filter_string=f"tags.`{SWEEP_TAG}` = '{parent_run_id}'",
    ):
        if "mmray.model_uri" in child.data.tags:
            models[child.data.tags[TRIAL_TAG]] = child.data.tags["mmray.model_uri"]
        elif child.data.tags[TRIAL_TAG] not in errored:
            client.set_tag(child.info.run_id, "mmray.early_stopped", "true")
            client.set_terminated(child.info.run_id, "KILLED")
    return models


def crown(sweep: SweepConfig, rows: list[dict], parent_run_id: str) -> dict[str, Any]:
    """Register the best finished trial's model; move ``champion`` to it only if it beats the
    current champion's figure from the same evaluation (metric, data, zero-shot folders)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri())
    finished = [r for r in rows if r["status"] == "finished" and r[sweep.metric] is not None]
    if not finished:
        raise RuntimeError("no trial finished its budget; nothing to register")
    best = finished[0]  # rows are sorted best first
    version = mlflow.register_model(best["model_uri"], sweep.registered_model)
    value = float(best[sweep.metric])
    base = sweep.base()
    data, evals = base.data, base.eval
    same_eval = json.dumps([sweep.metric, data.path, data.val_path, data.val_fraction,
                            evals.zeroshot, evals.max_pairs])  # fmt: skip
    try:
        current = client.get_model_version_by_alias(sweep.registered_model, "champion")
    except mlflow.exceptions.MlflowException:  # no champion yet
        current = None
    # The current champion's figure counts only if it came from the same evaluation.
    before = None
    if current is not None and current.tags.get("mmray.eval") == same_eval:
        before = float(current.tags[f"metric:{sweep.metric}"])
    better = current is None or (
        before is not None and (value > before if sweep.mode == "max" else value < before)
    )
    tags = {f"metric:{sweep.metric}": str(value), "champion_before": str(before),
            "mmray.eval": same_eval, SWEEP_TAG: parent_run_id, "trial": best["trial"]}  # fmt: skip
    for key, tag in tags.items():
        client.set_model_version_tag(sweep.registered_model, version.version, key, tag)
    if better:
        client.set_registered_model_alias(sweep.registered_model, "champion", version.version)
    return {
        "model_uri": f"models:/{sweep.registered_model}/{version.version}",
        "metric": value,
        "champion_before": before,
        "champion_moved": better,
    }


def run(sweep: SweepConfig) -> dict[str, Any]:
    import mlflow

    path = job.output_root(sweep.output) / sweep.name
    state = path / "mmray_sweep.json"  # the parent run id, for a restored sweep
    restoring = state.exists()
    parent_run_id = json.loads(state.read_text())["parent_run_id"] if restoring else None
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(sweep.tracking.experiment)
    with mlflow.start_run(run_id=parent_run_id, run_name=None if parent_run_id else sweep.name):
        parent_run_id = mlflow.active_run().info.run_id
        path.mkdir(parents=True, exist_ok=True)
        state.write_text(json.dumps({"parent_run_id": parent_run_id}))
        if not restoring:  # a restored sweep keeps the configuration it started with
            mlflow.log_params({k: str(v)[:500] for k, v in flatten(to_dict(sweep)).items()})
            space = to_dict(sweep.space) | {"cells": sweep.space.cells()}
            mlflow.log_dict(space, "search_space.json")
        start = time.perf_counter()
        results = _tuner(sweep, path, param_space(sweep, parent_run_id)).fit()
        errored = {(r.metrics or {}).get("trial_id") for r in results if r.error}
        rows = ablation_rows(results, sweep, trial_models(parent_run_id, errored))
        saved = sum(r["steps_saved"] for r in rows)
        mlflow.log_metrics({"trials": len(rows), "trial_steps_saved_by_early_stopping": saved,
                            "sweep_wall_s": time.perf_counter() - start})  # fmt: skip
        table = markdown(rows)
        mlflow.log_text(table, "ablation.md")
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        mlflow.log_text(text.getvalue(), "ablation.csv")
        for png in _plots(results, rows, sweep.metric, path):
            mlflow.log_artifact(str(png), "plots")
        champion = crown(sweep, rows, parent_run_id)
        mlflow.set_tags({f"champion.{k}": str(v) for k, v in champion.items()})
    print(table, file=sys.stderr)
    return {"run_id": parent_run_id, "trials": len(rows), "steps_saved": saved} | champion


def report(sweep_run_id: str) -> str:
    """The ablation table a sweep logged to MLflow."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.artifacts.load_text(f"runs:/{sweep_run_id}/ablation.md")


def parse_args(argv: list[str]) -> SweepConfig:
    p = argparse.ArgumentParser(prog="mmray tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML sweep config (pipelines/configs/tune/*.yaml)")
    add_data_flags(p)  # the trials' training data, as for mmray train
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = p.parse_args(argv)
    sweep = load_config(SweepConfig, args.config, args.overrides)
    sweep.overrides += data_overrides(args)  # the flags set the trials' training config
    return sweep


def check(sweep: SweepConfig) -> None:
    """The trials' references (shards, eval folders), the output path and the tracking store
    (the trials log to the sweep's), before Ray and MLflow start."""
    train_check(dataclasses.replace(sweep.base(), output=sweep.output))


def need(sweep: SweepConfig) -> job.Need:
    """The concurrent trials: each its own process, training workers and Ray Data tasks."""
    trial = train_need(sweep.base())
    n = sweep.max_concurrent_trials
    return job.Need(cpus=n * (DRIVER_CPUS + trial.cpus), gpus=n * trial.gpus,
                    data_cpus=n * trial.data_cpus)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        p = argparse.ArgumentParser(prog="mmray tune report")
        p.add_argument("sweep", help="the sweep's parent MLflow run id")
        print(report(p.parse_args(argv[1:]).sweep), end="")
        return 0
    return job.main("mmray tune", lambda: parse_args(argv), run, check, need)


if __name__ == "__main__":
    from pipelines.tune import main as module_main  # see pipelines/train.py

    sys.exit(module_main())
