"""Ablation sweeps: fusion × loss (× continuous hyperparameters × seeds) at fixed compute.

    mmray tune --config pipelines/configs/tune/tiny.yaml --data SHARDS [--zeroshot DIR] [k=v]
    mmray tune report SWEEP_RUN_ID          # the ablation table, from MLflow

Each trial is the training job (``pipelines.train.run``) launched from a Tune trial, Ray's
Train-in-Tune pattern: the trial function builds a ``TorchTrainer`` whose reports reach Tune
through ``TuneReportCallback``. Every trial gets the same samples-seen budget. ASHA stops
weak trials at evaluation steps. MLflow gets a parent run per sweep with the ablation
table, plots and search space, and a child run per trial. The best finished trial's model
is registered (or the trials' shared warm start, ``init.from``, where its training run scored
better on the same evaluation); alias ``champion`` moves to it only if it beats the current
champion on the same metric. Running the same sweep (``name``) again restores it: finished
trials are kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from mmcore import storage, tracking
from mmcore.config import ConfigError, flatten, load_config, replace, to_dict
from mmcore.losses.fusion import check_objectives
from mmcore.models.model import build_model
from mmcore.models.variants import OBJECTIVES
from mmcore.tracking import TrackingConfig
from mmcore.warmstart import plan
from pipelines import flags, job
from pipelines import train as training
from pipelines.ablation import Trial, ablation_rows, markdown, plots, to_csv
from pipelines.progress import Progress

log = logging.getLogger(__name__)
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
    draw_seed: int = 0  # seeds the draws of `sample`: the same sweep draws the same values
    num_samples: int = 1  # random draws per (fusion, loss, seed) cell
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])

    def validate(self) -> None:
        if self.num_samples < 1 or self.draw_seed < 0 or min(self.seeds, default=-1) < 0:
            raise ValueError("need num_samples >= 1, draw_seed >= 0 and seeds: [N >= 0, ...]")
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

    def validate(self) -> None:
        if self.grace_evals < 1 or self.reduction_factor < 2:
            raise ValueError("need grace_evals >= 1 and reduction_factor >= 2")


@dataclasses.dataclass(kw_only=True)
class SweepConfig:
    name: str = "sweep"  # the same name again restores the sweep
    train: str = "pipelines/configs/train/tiny.yaml"  # the trials' base training config
    # Training config values every trial gets over `train`, dotted or nested keys:
    # {eval.every: 50, data: {path: shards/}}. A mapping merges into the section it names.
    trial: dict[str, Any] = dataclasses.field(default_factory=dict)
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

    @functools.cached_property
    def base(self) -> training.TrainConfig:
        """The trials' common training config, built and validated once: at the fixed samples
        budget, every checkpoint an evaluation, paths absolute (Tune runs each trial in its
        own working directory)."""
        cfg = load_config(training.TrainConfig, self.train, values=flatten(self.trial))
        steps = self.samples_per_trial // cfg.schedule.global_batch
        if steps < 1:
            raise ValueError("samples_per_trial is less than one global batch")
        every = min(cfg.eval.every or steps, steps)
        absolute = lambda p: storage.absolute(p) if p else ""  # noqa: E731
        return replace(cfg, {
            "schedule.max_steps": steps, "eval.every": every, "schedule.checkpoint_every": every,
            "data.path": absolute(cfg.data.path), "data.val_path": absolute(cfg.data.val_path),
            "eval.zeroshot": [absolute(f) for f in cfg.eval.zeroshot],
            "output": storage.join(job.output_root(self.output), self.name, "trials"),
            "tracking": to_dict(self.tracking),
        })  # fmt: skip


def trial_config(config: dict[str, Any]) -> training.TrainConfig:
    """A Tune trial's training config: the base with its cell, seed and sampled values; a
    swept batch size keeps the samples budget fixed."""
    values = dict(config["cell"]) | {"schedule.seed": config["seed"]} | config.get("sample", {})
    cfg = replace(config["base"], values)
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
    training.run(trial_config(config), run_name=f"trial-{trial_id}", parent_run_id=parent,
                 tags={tracking.SWEEP_TAG: parent, tracking.TRIAL_TAG: trial_id},
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
        "base": sweep.base,  # the typed config: trials never re-read the YAML
        "samples_per_trial": sweep.samples_per_trial,
        "parent_run_id": parent_run_id,
        "tracking_uri": tracking.tracking_uri(),
    }


def _tuner(sweep: SweepConfig, path: str, space: dict) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    trainable = tune.with_resources(trial_fn, {"CPU": DRIVER_CPUS})
    if tune.Tuner.can_restore(path):
        log.info("restoring sweep %s: finished trials are kept", path)
        # The space again: Tune keeps its objects (the base config) in the object store, and
        # a new driver's trials not yet generated would get the dead driver's placeholders.
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True,
                                  param_space=space)  # fmt: skip
    scheduler = FIFOScheduler()
    if sweep.asha.enabled:
        base = sweep.base
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
            # Tune's default search with the draws seeded; it takes the concurrency limit itself.
            search_alg=BasicVariantGenerator(random_state=sweep.space.draw_seed,
                                             max_concurrent=sweep.max_concurrent_trials),
            num_samples=sweep.space.num_samples,
        ),
        # verbose=0: our progress line, not Tune's status table every 30 s, whose "current
        # best trial" line repeats the whole base config.
        run_config=tune.RunConfig(name=sweep.name, storage_path=job.output_root(sweep.output),
                                  callbacks=[_progress(sweep)], verbose=0),  # fmt: skip
    )  # fmt: skip


def _progress(sweep: SweepConfig) -> Any:
    """A Tune callback that shows the sweep's progress (``pipelines.progress``) in samples of
    the sweep's budget (trials × ``samples_per_trial``), as the trials report them: a trial
    that ends, early or not, counts whole. Counted in trials, the ETA grew while a trial ran
    (16 to 32 minutes, for a sweep that had 10 left). The fields: trials ended of all, how many
    run and were stopped early, and the best value of the metric so far."""
    from ray import tune

    space = sweep.space
    n_trials = len(space.cells()) * len(space.seeds) * space.num_samples
    budget = sweep.samples_per_trial
    better = max if sweep.mode == "max" else min

    class TrialProgress(tune.Callback):
        def setup(self, **info: Any) -> None:
            self.progress = Progress("tune", n_trials * budget, "samples", every_s=5.0,
                                     from_start=True)  # fmt: skip
            self.seen: dict[str, int] = {}  # trial id → samples counted
            self.running, self.ended, self.stopped, self.best = set(), 0, 0, None

        def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
            # A restored sweep's trials that ended before it was stopped: counted once here
            # (every trial of this run is in ``seen`` from its start).
            for trial in trials:
                if trial.status in ("TERMINATED", "ERROR") and trial.trial_id not in self.seen:
                    self._ended(trial, failed=trial.status == "ERROR")

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.running.add(trial.trial_id)
            self._show(trial, 0)

        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            if (value := result.get(sweep.metric)) is not None:
                self.best = value if self.best is None else better(self.best, value)
            self._show(trial, min(result.get("train/samples_seen", 0), budget))

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._ended(trial)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._ended(trial, failed=True)

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            self.progress.close()

        def _ended(self, trial: Any, failed: bool = False) -> None:
            seen = (trial.last_result or {}).get("train/samples_seen", 0)
            self.stopped += not failed and seen < budget  # ASHA stopped it
            self.running.discard(trial.trial_id)
            self.ended += 1
            self._show(trial, budget)  # what it did not train is not left to do either

        def _show(self, trial: Any, seen: int) -> None:
            # A trial restored from a checkpoint reports fewer samples than it had: not negative.
            before = self.seen.get(trial.trial_id, 0)
            self.seen[trial.trial_id] = max(seen, before)
            done = self.seen[trial.trial_id] - before
            best = "-" if self.best is None else f"{self.best:.3f}"
            self.progress.update(done, trials=f"{self.ended}/{n_trials}", running=len(self.running),
                                 **{"stopped early": self.stopped,
                                    f"best {sweep.metric}": best})  # fmt: skip

    return TrialProgress()


def _trials(results: Any) -> list[Trial]:
    """Tune's results → what the ablation table needs."""
    return [
        Trial(id=(r.metrics or {}).get("trial_id", Path(r.path).name), config=r.config,
              metrics=r.metrics or {}, history=r.metrics_dataframe, errored=r.error is not None)
        for r in results
    ]  # fmt: skip


def crown(sweep: SweepConfig, rows: list[dict], parent_run_id: str) -> dict[str, Any]:
    """Register the best finished trial's model, or the sweep's shared warm start where that
    scored better on the same evaluation (fine-tuning can make a model worse); ``champion``
    moves to it only if it beats the current champion on the same evaluation (metric, data,
    zero-shot folders)."""
    finished = [r for r in rows if r["status"] == "finished" and r[sweep.metric] is not None]
    if not finished:
        raise RuntimeError("no trial finished its budget; nothing to register")
    best = finished[0]  # rows are sorted best first
    pick = {"trial": best["trial"], "model_uri": best["model_uri"], "value": best[sweep.metric]}
    source = warm_start(sweep)
    if source and tracking.beats(source["value"], pick["value"], sweep.mode == "max"):
        pick = source
    name = pick["trial"] if pick is source else f"trial {pick['trial']}"
    log.info("crowning the %s (%s %.4f; best trial %.4f)", name, sweep.metric, pick["value"],
             best[sweep.metric])  # fmt: skip
    tags = {tracking.SWEEP_TAG: parent_run_id, "trial": pick["trial"]}
    if sweep.base.init.source:
        tags["init.from"] = sweep.base.init.source
    evaluation = json.dumps([sweep.metric, *sweep.base.eval_setup()])
    return {"crowned": pick["trial"]} | tracking.promote(
        sweep.registered_model, pick["model_uri"], sweep.metric, float(pick["value"]),
        sweep.mode == "max", evaluation, tags,
    )  # fmt: skip


def warm_start(sweep: SweepConfig) -> dict[str, Any] | None:
    """The trials' shared warm start as a candidate for champion: its training run's model and
    last figure on the sweep's metric, when that run was evaluated as the trials are (its
    ``mmray.eval_setup`` tag); None otherwise (no warm start, a folder, another evaluation)."""
    source = sweep.base.init.source
    if not source.startswith(tracking.MODEL_URI_SCHEMES):
        return None
    run_id = tracking.registry_ref(source).run_id
    data = tracking.run_data(run_id) if run_id else None
    setup = json.dumps(sweep.base.eval_setup())
    if data is None or data.tags.get(tracking.EVAL_SETUP_TAG) != setup:
        log.info("the warm start %s was evaluated otherwise: it does not compete", source)
        return None
    if sweep.metric not in data.metrics or tracking.MODEL_TAG not in data.tags:
        return None
    value = data.metrics[sweep.metric]
    return {"trial": "warm start", "model_uri": data.tags[tracking.MODEL_TAG], "value": value}


def _state(sweep: SweepConfig) -> tuple[str, str]:
    """The sweep's folder, and its file with the parent run id (for a restored sweep)."""
    path = storage.join(job.output_root(sweep.output), sweep.name)
    return path, storage.join(path, "mmray_sweep.json")


def run(sweep: SweepConfig) -> dict[str, Any]:
    path, state = _state(sweep)
    restoring = storage.exists(state)
    parent_run_id = storage.read_json(state)["parent_run_id"] if restoring else None
    with tracking.start_run(sweep.tracking, sweep.name, run_id=parent_run_id) as tracker:
        parent_run_id = tracker.run_id
        storage.write_json(state, {"parent_run_id": parent_run_id})
        job.write_config(sweep, path)
        if not restoring:  # a restored sweep keeps the configuration it started with
            tracker.log_params(to_dict(sweep))
            tracker.log_dict(to_dict(sweep.space) | {"cells": sweep.space.cells()},
                             "search_space.json")  # fmt: skip
        start = time.perf_counter()
        # Ctrl-C stops a sweep as it stops any job: "interrupted", exit 130, and the same
        # command resumes it. Tune's own SIGINT handler ended fit() as if the sweep were done,
        # which then crowned from whatever trials had finished (or failed: none had).
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        try:
            trials = _trials(_tuner(sweep, path, param_space(sweep, parent_run_id)).fit())
        except KeyboardInterrupt:
            log.warning("sweep %s stopped: the same command again resumes it", sweep.name)
            if parent_run_id:
                tracking.end_interrupted_trials(parent_run_id)
            raise
        models = tracking.sweep_models(parent_run_id, {t.id for t in trials if t.errored})
        rows = ablation_rows(trials, sweep.metric, sweep.mode, sweep.samples_per_trial,
                             sweep.base.schedule.global_batch, models)  # fmt: skip
        saved = sum(r["steps_saved"] for r in rows)
        tracker.log_metrics({"trials": len(rows), "trial_steps_saved_by_early_stopping": saved,
                             "sweep_wall_s": time.perf_counter() - start})  # fmt: skip
        table = markdown(rows)
        tracker.log_text(table, "ablation.md")
        tracker.log_text(to_csv(rows), "ablation.csv")
        with tempfile.TemporaryDirectory() as folder:
            for png in plots(trials, rows, sweep.metric, Path(folder)):
                tracker.log_artifact(png, "plots")
                storage.put_file(png, storage.join(path, png.name))
        champion = crown(sweep, rows, parent_run_id)
        tracker.set_tags({f"champion.{k}": str(v) for k, v in champion.items()})
    print(table, file=sys.stderr)
    return {"run_id": parent_run_id, "trials": len(rows), "steps_saved": saved} | champion


def parse_args(argv: list[str]) -> SweepConfig:
    p = flags.parser("mmray tune", __doc__, flags.TUNE, "YAML sweep config (configs/tune/*.yaml)")
    args = p.parse_args(argv)
    sweep = load_config(SweepConfig, args.config, args.overrides, flags.values(args, flags.TUNE))
    # Here, else next to the sweep's YAML, else mmray's own (as the shipped sweeps name it).
    beside = [Path(args.config).parent] if args.config else []
    sweep.train = flags.config_path(sweep.train, *beside)
    return sweep


def check(sweep: SweepConfig) -> None:
    """The trials' references (shards, eval folders), the output path and the tracking store
    (the trials log to the sweep's), and a shared warm start against every fusion variant
    swept, before Ray and MLflow start."""
    base = dataclasses.replace(sweep.base, output=sweep.output)
    training.check(base)
    fusions = {cell["model.fusion"] for cell in sweep.space.cells()} - {base.model.fusion}
    for fusion in sorted(fusions) if base.init.source else []:
        plan(base.init, build_model(dataclasses.replace(base.model, fusion=fusion)))
    path, state = _state(sweep)
    if sweep.tracking.enabled and storage.exists(state):  # the same sweep again: restored
        if run_id := storage.read_json(state)["parent_run_id"]:
            try:
                tracking.check_run(run_id, f"sweep {sweep.name!r} ({path})")
            except ConfigError as e:
                raise ConfigError(
                    f"{e}. Running a sweep again restores it into its parent run: restore it "
                    "with the MLFLOW_TRACKING_URI it started with, or start a new sweep "
                    f"(name=..., output=..., or remove {path})"
                ) from e


def need(sweep: SweepConfig) -> job.Need:
    """The concurrent trials: each its own process, training workers and Ray Data tasks."""
    trial = training.need(sweep.base)
    n = sweep.max_concurrent_trials
    return job.Need(cpus=n * (DRIVER_CPUS + trial.cpus), gpus=n * trial.gpus,
                    data_cpus=n * trial.data_cpus)  # fmt: skip


def report(sweep: str) -> str:
    """The ablation table of sweep run ``sweep``; ``ConfigError`` for a run that is not one
    (an unknown run was MLflow's traceback)."""
    from mlflow.exceptions import MlflowException

    tracking.check_run(sweep, "sweep")
    try:
        return tracking.load_text(f"runs:/{sweep}/ablation.md")
    except MlflowException:
        raise ConfigError(f"run {sweep} has no ablation.md: not a sweep (the run_id of mmray "
                          "tune's JSON line), or one that has not finished") from None  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        p = argparse.ArgumentParser(prog="mmray tune report")
        p.add_argument("sweep", help="the sweep's parent MLflow run id")
        try:
            print(report(p.parse_args(argv[1:]).sweep), end="")
        except ConfigError as e:
            return job.refuse("mmray tune report", e)
        return 0
    return job.main("mmray tune", lambda: parse_args(argv), run, check, need)


if __name__ == "__main__":
    from pipelines.tune import main as module_main  # see pipelines/train.py

    sys.exit(module_main())
