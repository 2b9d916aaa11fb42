"""The one place that talks to MLflow.

``MLFLOW_TRACKING_URI`` wins when set; otherwise runs go to an embedded store in the working
directory (``sqlite:///$PWD/mlflow.db``, artifacts under ``./mlruns``). Jobs call
``start_run(...)`` and get a ``Tracker``; ``NullTracker`` is the no-op used when tracking is
off (or on ranks other than 0), so job code never branches on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mmcore import storage
from mmcore.config import ConfigError, flatten

log = logging.getLogger(__name__)

# MLflow draws a progress bar per artifact download: a dozen lines in a job's log for each
# model fetched (a warm start, every trial, the serve job). MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
# set to true brings them back.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

_MAX_PARAM_LEN = 6000  # MLflow rejects longer param values


@dataclasses.dataclass(kw_only=True)
class TrackingConfig:
    enabled: bool = True  # false: no MLflow run at all
    experiment: str = "mmray"  # MLflow experiment (created when missing)


def tracking_uri() -> str:
    """The tracking URI jobs use: the environment's, else an embedded local store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


_warm_up: threading.Thread | None = None


def warm_up(cfg: TrackingConfig) -> None:
    """Open the store and the experiment on a background thread while the job starts (an
    embedded store is created in ~4 s: importing mlflow, creating its tables); ``start_run``
    waits for it. A failure here is left for ``start_run`` to report."""
    global _warm_up
    if not cfg.enabled or _warm_up is not None:
        return

    def open_store() -> None:
        try:
            import mlflow

            mlflow.set_tracking_uri(tracking_uri())
            mlflow.set_experiment(cfg.experiment)
        except Exception:  # noqa: BLE001 - start_run opens it again and says what failed
            log.debug("MLflow warm-up failed", exc_info=True)

    _warm_up = threading.Thread(target=open_store, name="mlflow-warm-up", daemon=True)
    _warm_up.start()


class NullTracker:
    """Tracking switched off: every call does nothing."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_dict(self, data: Any, artifact_file: str) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_dataset(self, source: str, name: str, digest: str, context: str) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...


class Tracker(NullTracker):
    """An active MLflow run; thin methods so that callers never import mlflow."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        import mlflow

        flat = flatten(dict(params))
        mlflow.log_params({k: str(v)[:_MAX_PARAM_LEN] for k, v in flat.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        import mlflow

        mlflow.log_dict(data, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path)

    def log_dataset(self, source: str, name: str, digest: str, context: str) -> None:
        """Record a dataset as this run's input (lineage), identified by ``digest``."""
        import mlflow
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        with warnings.catch_warnings():  # "can be interpreted in multiple ways": same class
            warnings.simplefilter("ignore", UserWarning)
            resolved = resolve_dataset_source(source)
        dataset = MetaDataset(resolved, name=name, digest=digest[:36])
        mlflow.log_input(dataset, context=context)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        import mlflow

        mlflow.set_tags(dict(tags))

    def log_text(self, text: str, artifact_file: str) -> None:
        import mlflow

        mlflow.log_text(text, artifact_file)


@contextlib.contextmanager
def start_run(
    cfg: TrackingConfig, run_name: str | None = None, parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None, run_id: str | None = None,
) -> Iterator[NullTracker]:  # fmt: skip
    """Open an MLflow run in ``cfg.experiment`` for the ``with`` block (no-op if disabled);
    with ``parent_run_id``, a child run nested under it (a sweep's trial); with ``run_id``,
    that run again (a restored sweep)."""
    if not cfg.enabled:
        yield NullTracker()
        return
    if _warm_up is not None:
        _warm_up.join()
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(cfg.experiment)
    with mlflow.start_run(
        run_id=run_id,
        run_name=None if run_id else run_name,
        parent_run_id=parent_run_id,
        tags=dict(tags or {}),
    ) as run:
        log.info("MLflow run %s in %s (%s)", run.info.run_id, cfg.experiment, tracking_uri())
        try:
            yield Tracker(run.info.run_id)
        except KeyboardInterrupt:  # stopped by its user (Ctrl-C, SIGTERM): KILLED, not FAILED
            mlflow.end_run("KILLED")
            raise


def download_artifacts(uri: str) -> Path:
    """A ``runs:/…``, ``models:/…`` or ``mlflow-artifacts:/…`` URI → a local folder with its
    files: the store's own folder where it keeps artifacts as local files, else a copy in
    ``storage.cached`` (fetched once per machine, keyed by the store and the artifacts'
    location, which an alias that moves changes)."""
    from urllib.parse import urlparse

    import mlflow
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

    store = tracking_uri()
    mlflow.set_tracking_uri(store)
    if uri.startswith("runs:/"):
        uri = RunsArtifactRepository.get_underlying_uri(uri)
    elif uri.startswith("models:/"):
        uri = ModelsArtifactRepository.get_underlying_uri(uri)
    if urlparse(uri).scheme in ("", "file"):
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))

    def fetch(tmp: Path) -> str:
        return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp))

    return storage.cached(f"{store} {uri}", fetch)


def log_model(
    export_dir: str | Path, name: str = "model", registered_name: str | None = None
) -> str:
    """Log an export folder as a pyfunc model of the active run; returns its model URI."""
    import mlflow

    from mmcore.pyfunc import INPUT_EXAMPLE, SIGNATURE

    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    pyfunc_log.setLevel(logging.WARNING)  # its "Validating input example" line, every model
    try:
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(Path(__file__).with_name("pyfunc_code.py")),  # code, not a pickle
            artifacts={"model": str(export_dir)},
            signature=SIGNATURE,
            input_example=INPUT_EXAMPLE,
            registered_model_name=registered_name,
            pip_requirements=["mmray"],
        )
    finally:
        pyfunc_log.setLevel(level)
    return info.model_uri


def log_metrics_to(run_id: str, metrics: Mapping[str, float], step: int, uri: str) -> None:
    """Log metrics to an existing run from another process (rank 0 of a training job)."""
    import time

    import mlflow
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    mlflow.MlflowClient(tracking_uri=uri).log_batch(run_id, metrics=batch)


MODEL_URI_SCHEMES = ("runs:/", "models:/")


@dataclasses.dataclass
class ModelRef:
    """A model URI resolved once: the local export folder and what the URI names now."""

    uri: str
    resolved: str  # fixed when an alias moves: models:/NAME/VERSION; else the URI
    folder: Path
    name: str
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # the run's eval/*

    def info(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "folder"}


def resolve_model(uri: str | Path) -> ModelRef:
    """A model folder (local or in object storage), ``runs:/ID/model``, ``models:/NAME@ALIAS``,
    ``models:/NAME/VERSION`` or ``models:/m-…`` → its ``ModelRef``. An alias is resolved to its
    version first, and that version is downloaded, so the weights and the version reported
    agree."""
    from mmcore.export import find_export, local_folder

    text = str(uri)
    if not text.startswith(MODEL_URI_SCHEMES):
        return ModelRef(text, text, local_folder(text), storage.name(text))
    ref = registry_ref(text)
    ref.folder = find_export(download_artifacts(ref.resolved))
    return ref


def load(uri: str | Path) -> Any:
    """The ``ImageTextModel`` a model URI or folder names."""
    from mmcore.export import load_model

    return load_model(resolve_model(uri).folder)


def check_model(uri: str | Path) -> None:
    """``ConfigError`` saying what was not found where, unless ``uri`` names a model. Cheap
    (downloads nothing), so jobs call it before any work starts."""
    from mmcore.export import check_folder

    if str(uri).startswith(MODEL_URI_SCHEMES):
        check_model_uri(str(uri))
    else:
        check_folder(uri)


def registry_ref(text: str) -> ModelRef:
    """A ``runs:/`` or ``models:/`` URI → what it names in the tracking store (run, registered
    name and version, the run's eval metrics), downloading nothing: ``folder`` is unset."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri())
    ref = ModelRef(text, text, Path(), text)
    if text.startswith("runs:/"):
        ref.run_id = text.removeprefix("runs:/").split("/")[0]
    elif "@" in text:  # models:/NAME@ALIAS
        ref.name, ref.alias = text.removeprefix("models:/").split("@", 1)
        version = client.get_model_version_by_alias(ref.name, ref.alias)
        ref.version, ref.run_id = version.version, version.run_id
        ref.resolved = f"models:/{ref.name}/{version.version}"
    elif "/" in text.removeprefix("models:/"):  # models:/NAME/VERSION
        ref.name, number = text.removeprefix("models:/").rsplit("/", 1)
        version = client.get_model_version(ref.name, number)
        ref.version, ref.run_id = version.version, version.run_id
    else:  # models:/m-... (a logged model)
        ref.run_id = client.get_logged_model(text.removeprefix("models:/")).source_run_id
    if ref.run_id:
        metrics = client.get_run(ref.run_id).data.metrics
        ref.metrics = {k: v for k, v in sorted(metrics.items()) if k.startswith("eval/")}
    return ref


def check_model_uri(uri: str) -> None:
    """``ConfigError`` unless the tracking store knows the model ``uri`` names (the run and
    its artifact folder, the registered version or alias, or the logged model)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    store = _existing_store(f"model {uri}")
    try:
        ref = registry_ref(uri)
        if uri.startswith("runs:/"):
            path = uri.removeprefix("runs:/").partition("/")[2]
            if not mlflow.MlflowClient(store).list_artifacts(ref.run_id, path or None):
                raise ConfigError(f"model {uri}: the run has no artifacts at {path!r} ({store})")
    except MlflowException as e:
        raise ConfigError(
            f"model {uri} was not found in the MLflow store {store} (MLFLOW_TRACKING_URI "
            f"{'is set' if os.environ.get('MLFLOW_TRACKING_URI') else 'is not set'}): "
            f"{e.message}"
        ) from e


def check_run(run_id: str, what: str) -> None:
    """``ConfigError`` (``what`` says whose run it is) unless the tracking store has the run."""
    import mlflow
    from mlflow.exceptions import MlflowException

    store = _existing_store(what)
    try:
        mlflow.MlflowClient(store).get_run(run_id)
    except MlflowException as e:
        raise ConfigError(f"{what}: MLflow run {run_id} is not in the store {store}") from e


def _existing_store(what: str) -> str:
    """The tracking URI, or ``ConfigError`` where it names a SQLite file that does not exist
    (looking there would create an empty store)."""
    store = tracking_uri()
    if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).exists():
        raise ConfigError(
            f"{what}: there is no MLflow store at {store}; set MLFLOW_TRACKING_URI to the "
            "store that holds it"
        )
    return store


def lineage_tags() -> dict[str, str]:
    """Package versions and the git commit, as run tags."""
    import subprocess
    from importlib.metadata import version

    tags = {f"version.{p}": version(p) for p in ("torch", "ray", "deepspeed", "transformers")}
    sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    tags["git_sha"] = sha.stdout.strip() if sha.returncode == 0 else "unknown"
    return tags


def load_text(uri: str) -> str:
    """A text artifact, e.g. ``runs:/ID/ablation.md``."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.artifacts.load_text(uri)


# --- sweeps and the registry ------------------------------------------------------------------

SWEEP_TAG, TRIAL_TAG, MODEL_TAG = "mmray.sweep", "mmray.trial", "mmray.model_uri"
EVAL_SETUP_TAG = "mmray.eval_setup"  # a training run's TrainConfig.eval_setup(), as JSON


def run_data(run_id: str) -> Any:
    """A run's tags, params and latest metrics (MLflow's ``RunData``)."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri()).get_run(run_id).data


def _sweep_children(parent_run_id: str) -> tuple[Any, list[Any]]:
    """An MLflow client, and the sweep's trial runs, oldest first."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri())
    children = client.search_runs(
        [client.get_run(parent_run_id).info.experiment_id],
        filter_string=f"tags.`{SWEEP_TAG}` = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
    )
    return client, children


def end_interrupted_trials(parent_run_id: str) -> None:
    """A sweep stopped by its user (Ctrl-C): its running trials' runs end KILLED, not RUNNING
    for ever. A restored sweep runs those trials again."""
    client, children = _sweep_children(parent_run_id)
    for child in children:
        if child.info.status == "RUNNING":
            client.set_terminated(child.info.run_id, "KILLED")


def sweep_models(parent_run_id: str, errored: set[str]) -> dict[str, str]:
    """Trial id → the model its run logged, for a sweep's child runs. Runs of trials that
    early stopping interrupted ended as RUNNING or FAILED: they are marked KILLED here. A
    trial that a restored sweep ran again has one run per attempt: the earlier ones, left
    RUNNING by the driver that died, are marked KILLED and ``mmray.superseded``."""
    client, children = _sweep_children(parent_run_id)
    last = {child.data.tags[TRIAL_TAG]: child.info.run_id for child in children}
    models = {}
    for child in children:
        trial, tags = child.data.tags[TRIAL_TAG], child.data.tags
        if child.info.run_id != last[trial]:
            if child.info.status == "RUNNING":
                client.set_tag(child.info.run_id, "mmray.superseded", "true")
                client.set_terminated(child.info.run_id, "KILLED")
        elif MODEL_TAG in tags:
            models[trial] = tags[MODEL_TAG]
        elif trial not in errored:
            client.set_tag(child.info.run_id, "mmray.early_stopped", "true")
            client.set_terminated(child.info.run_id, "KILLED")
    return models


def beats(value: float, than: float, higher_is_better: bool) -> bool:
    """Whether ``value`` is strictly better than ``than`` on a metric of that direction."""
    return value > than if higher_is_better else value < than


def promote(
    registered_model: str, model_uri: str, metric: str, value: float, higher_is_better: bool,
    evaluation: str, tags: Mapping[str, str],
) -> dict[str, Any]:  # fmt: skip
    """Register ``model_uri`` as a new version; move alias ``champion`` to it only if its
    ``metric`` beats the current champion's figure from the same ``evaluation`` (a string
    naming the metric, data and settings; a figure from another evaluation never counts).
    The same promotion again (a restored sweep that had crowned already) returns the version
    registered then and moves nothing."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri())
    tags = {f"metric:{metric}": str(value), "mmray.eval": evaluation, **tags}
    done = [
        v for v in client.search_model_versions(f"name='{registered_model}'")
        if v.source == model_uri and tags.items() <= v.tags.items()
    ]  # fmt: skip
    if done:
        version, better = done[0], False
        before = None if (b := version.tags["champion_before"]) == "None" else float(b)
    else:
        version = mlflow.register_model(model_uri, registered_model)
        try:
            current = client.get_model_version_by_alias(registered_model, "champion")
        except mlflow.exceptions.MlflowException:  # no champion yet
            current = None
        before = None
        if current is not None and current.tags.get("mmray.eval") == evaluation:
            before = float(current.tags[f"metric:{metric}"])
        better = current is None or (before is not None and beats(value, before, higher_is_better))
        for key, tag in (tags | {"champion_before": str(before)}).items():
            client.set_model_version_tag(registered_model, version.version, key, tag)
        if better:
            client.set_registered_model_alias(registered_model, "champion", version.version)
    return {
        "model_uri": f"models:/{registered_model}/{version.version}",
        "metric": value,
        "champion_before": before,
        "champion_moved": better,
    }
