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
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mmcore.config import ConfigError, flatten

log = logging.getLogger(__name__)

_MAX_PARAM_LEN = 6000  # MLflow rejects longer param values


@dataclasses.dataclass(kw_only=True)
class TrackingConfig:
    enabled: bool = True  # false: no MLflow run at all
    experiment: str = "mmray"  # MLflow experiment (created when missing)


def tracking_uri() -> str:
    """The tracking URI jobs use: the environment's, else an embedded local store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


class NullTracker:
    """Tracking switched off: every call does nothing."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_dict(self, data: Any, artifact_file: str) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_dataset(self, source: str, name: str, digest: str, context: str) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...


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


@contextlib.contextmanager
def start_run(
    cfg: TrackingConfig, run_name: str | None = None, parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[NullTracker]:  # fmt: skip
    """Open an MLflow run in ``cfg.experiment`` for the ``with`` block (no-op if disabled);
    with ``parent_run_id``, a child run nested under it (a sweep's trial)."""
    if not cfg.enabled:
        yield NullTracker()
        return
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(cfg.experiment)
    with mlflow.start_run(
        run_name=run_name, parent_run_id=parent_run_id, tags=dict(tags or {})
    ) as run:
        log.info("MLflow run %s in %s (%s)", run.info.run_id, cfg.experiment, tracking_uri())
        yield Tracker(run.info.run_id)


def download_artifacts(uri: str) -> Path:
    """A ``runs:/…`` or ``models:/NAME@ALIAS`` URI → a local folder with its files."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))


def log_model(
    export_dir: str | Path, name: str = "model", registered_name: str | None = None
) -> str:
    """Log an export folder as a pyfunc model of the active run; returns its model URI."""
    import mlflow

    from mmcore.pyfunc import INPUT_EXAMPLE, SIGNATURE, ImageTextPyfunc

    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=ImageTextPyfunc(),
        artifacts={"model": str(export_dir)},
        signature=SIGNATURE,
        input_example=INPUT_EXAMPLE,
        registered_model_name=registered_name,
        pip_requirements=["mmray"],
    )
    return info.model_uri


def log_metrics_to(run_id: str, metrics: Mapping[str, float], step: int, uri: str) -> None:
    """Log metrics to an existing run from another process (rank 0 of a training job)."""
    import time

    import mlflow
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    mlflow.MlflowClient(tracking_uri=uri).log_batch(run_id, metrics=batch)


def model_info(uri: str) -> dict[str, Any]:
    """What a model URI names now: ``resolved`` (a URI that stays fixed when an alias moves:
    ``models:/NAME/VERSION``), name, version, alias, run_id, and the run's ``eval/*`` metrics.
    A local folder has only its name."""
    text = str(uri)
    info: dict[str, Any] = {"uri": text, "resolved": text, "name": Path(text).name,
                            "version": None, "alias": None, "run_id": None,
                            "metrics": {}}  # fmt: skip
    if not text.startswith(("models:/", "runs:/")):
        return info
    import mlflow

    client = mlflow.MlflowClient(tracking_uri())
    if text.startswith("runs:/"):
        info |= {"name": text, "run_id": text.removeprefix("runs:/").split("/")[0]}
    elif "@" in text:  # models:/NAME@ALIAS
        name, alias = text.removeprefix("models:/").split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
        info |= {"name": name, "alias": alias, "version": version.version,
                 "run_id": version.run_id,
                 "resolved": f"models:/{name}/{version.version}"}  # fmt: skip
    elif "/" in text.removeprefix("models:/"):  # models:/NAME/VERSION
        name, number = text.removeprefix("models:/").rsplit("/", 1)
        version = client.get_model_version(name, number)
        info |= {"name": name, "version": version.version, "run_id": version.run_id}
    else:  # models:/m-... (a logged model)
        info["run_id"] = client.get_logged_model(text.removeprefix("models:/")).source_run_id
    if info["run_id"]:
        metrics = client.get_run(info["run_id"]).data.metrics
        info["metrics"] = {k: v for k, v in sorted(metrics.items()) if k.startswith("eval/")}
    return info


def check_model_uri(uri: str) -> None:
    """``ConfigError`` unless the tracking store knows the model ``uri`` names (the run and
    its artifact folder, the registered version or alias, or the logged model)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    store = tracking_uri()
    if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).exists():
        raise ConfigError(  # looking would create an empty store there
            f"model {uri}: there is no MLflow store at {store}; set MLFLOW_TRACKING_URI to "
            "the store that holds it"
        )
    try:
        info = model_info(uri)
        if uri.startswith("runs:/"):
            path = uri.removeprefix("runs:/").partition("/")[2]
            if not mlflow.MlflowClient(store).list_artifacts(info["run_id"], path or None):
                raise ConfigError(f"model {uri}: the run has no artifacts at {path!r} ({store})")
    except MlflowException as e:
        raise ConfigError(
            f"model {uri} was not found in the MLflow store {store} (MLFLOW_TRACKING_URI "
            f"{'is set' if os.environ.get('MLFLOW_TRACKING_URI') else 'is not set'}): "
            f"{e.message}"
        ) from e
