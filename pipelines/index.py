"""A search index from ``mmray embed``'s output, logged to MLflow beside the model version that
embedded it.

    mmray index --embeddings data/embeddings --output data/index
    mmray serve --model models:/mmray-tiny/3 --index runs:/RUN_ID/indexes/embeddings

The index (``mmcore.vectors``: exact up to 20 000 rows, a 4-bit product-quantised scan with
exact re-ranking above) goes to ``--output`` (a folder or bucket prefix) and, where the
embeddings came from a registered version, a logged model or a run (``models:/NAME/VERSION``,
``models:/m-…``, ``runs:/``), into that run's artifacts under ``indexes/<name>``, a
registered version tagged ``mmray.index.<name>``: the index and the model version it belongs
to stay together. Serve loads it with ``--index`` (the output folder or the artifact URI) and
refuses it for another model version.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa

from mmcore import storage
from mmcore.config import ConfigError, load_config
from mmcore.tracking import MODEL_URI_SCHEMES, registry_ref, tracking_uri
from mmcore.vectors import VectorIndex
from pipelines import flags, job
from pipelines.embed import MANIFEST, PARTS

log = logging.getLogger(__name__)


@dataclasses.dataclass(kw_only=True)
class IndexConfig:
    embeddings: str = ""  # a finished `mmray embed` output
    output: str = ""  # where the index goes
    name: str = ""  # its name among the model's indexes; default: the embeddings folder's
    # Log it into the MLflow run of the model version that embedded (MLFLOW_TRACKING_URI, or
    # the embedded store); the job starts no run of its own.
    register: bool = True

    def validate(self) -> None:
        missing = [f"--{k}" for k in ("embeddings", "output") if not getattr(self, k)]
        if missing:
            raise ValueError(f"{', '.join(missing)} required")


def _manifest(embeddings: str) -> dict[str, Any]:
    path = storage.join(embeddings, MANIFEST)
    if not storage.exists(path):
        raise ConfigError(f"{embeddings} is no finished `mmray embed` output (no {MANIFEST})")
    return storage.read_json(path)


def read_embeddings(embeddings: str) -> tuple[np.ndarray, list[str], list[str]]:
    """Every part's image embeddings (N, E), keys and captions, in key order."""
    parts = storage.list_files(storage.join(embeddings, PARTS), ".parquet")
    columns = ["key", "caption", "image_embedding"]
    table = pa.concat_tables(storage.read_parquet(p, columns) for p in parts)
    table = table.sort_by("key")
    flat = table.column("image_embedding").combine_chunks()
    vectors = flat.flatten().to_numpy().reshape(len(table), flat.type.list_size)
    return vectors, table.column("key").to_pylist(), table.column("caption").to_pylist()


def work(cfg: IndexConfig) -> dict[str, Any]:
    import mlflow

    manifest = _manifest(cfg.embeddings)
    version, name = manifest["model_version"], cfg.name or storage.name(cfg.embeddings)
    start = time.perf_counter()
    vectors, keys, captions = read_embeddings(cfg.embeddings)
    index = VectorIndex.build(vectors, keys, captions, version)
    build_s = time.perf_counter() - start
    artifact = None
    with tempfile.TemporaryDirectory() as folder:
        index.save(folder)
        storage.upload_dir(folder, out := storage.absolute(cfg.output))
        tracked = cfg.register and version.startswith(MODEL_URI_SCHEMES)
        ref = registry_ref(version) if tracked else None
        if ref is not None and ref.run_id:
            client = mlflow.MlflowClient(tracking_uri())
            client.log_artifacts(ref.run_id, folder, f"indexes/{name}")
            artifact = f"runs:/{ref.run_id}/indexes/{name}"
            if ref.version is not None:  # a registered version
                client.set_model_version_tag(ref.name, ref.version, f"mmray.index.{name}", artifact)
        else:
            log.info("%s is no MLflow model version: the index is at %s only", version, out)
    return {"output": out, "artifact_uri": artifact, "model_version": version,
            "rows": len(keys), "kind": index.meta["kind"], "build_s": build_s}  # fmt: skip


def parse_args(argv: list[str]) -> IndexConfig:
    p = flags.parser("mmray index", __doc__, flags.INDEX, "YAML config (optional)")
    args = p.parse_args(argv)
    return load_config(IndexConfig, args.config, args.overrides, flags.values(args, flags.INDEX))


def check(cfg: IndexConfig) -> None:
    job.check_input("--embeddings", cfg.embeddings)
    _manifest(cfg.embeddings)
    job.check_output("output", cfg.output)
    storage.check_writable("output", cfg.output)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return job.main("mmray index", lambda: parse_args(argv), work, check)


if __name__ == "__main__":
    sys.exit(main())
