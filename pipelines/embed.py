"""Batch embedding over curated shards, on Ray Data: each sample's image and caption
embeddings and how well they align, as parquet.

    mmray embed --model models:/mmray-tiny@champion --data shards/ --output embeddings/
    ray job submit --working-dir . -- python -m pipelines.embed --model ... --data ... --output ...

Ray Data reads the shards and decodes and preprocesses them on CPU tasks; a pool of actors
(``compute.concurrency``, each ``compute.num_cpus`` CPUs and ``compute.num_gpus`` GPUs) holds
the model and embeds ``compute.batch_size`` pairs a call. Each call writes one part,
``parts/<first key>.parquet``: ``key``, ``image_embedding``, ``text_embedding`` (unit norm),
``alignment`` (the pair's cosine; the ITM match probability for fusion variants) and
``caption``, its file metadata naming the model version. ``manifest.json`` is written last.
Run again, the same command skips the samples already in parts (a killed job resumes), and
refuses an output that another model version wrote. ``mmray index`` builds a search index
from the output.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import time
from typing import Any

import numpy as np
import pyarrow as pa

from mmcore import storage
from mmcore.config import ConfigError, load_config, to_dict
from mmcore.data.inputs import preprocess, texts
from mmcore.export import read_config
from mmcore.models.variants import VARIANTS
from mmcore.tracking import (
    ModelRef,
    TrackingConfig,
    check_model,
    resolve_model,
    start_run,
    tracking_uri,
)
from pipelines import flags, job
from pipelines.alignment import MODEL_KEY, written_by  # parts name their model version
from pipelines.progress import Progress, ray_data_bars_off

log = logging.getLogger(__name__)
MANIFEST, PARTS = "manifest.json", "parts"


@dataclasses.dataclass(kw_only=True)
class ComputeConfig:
    concurrency: int = 1  # model actors
    batch_size: int = 64  # pairs per model call, and per part file
    num_cpus: float = 1.0  # per model actor
    num_gpus: float = 0.0  # per model actor, on a GPU cluster
    # CPUs per decoding task. Unlike the actors' num_cpus, so Ray Data keeps decoding in tasks
    # beside the model instead of fusing it into the actors.
    prepare_cpus: float = 0.5

    def validate(self) -> None:
        if self.concurrency < 1 or self.batch_size < 1:
            raise ValueError("concurrency and batch_size must be >= 1")
        if self.prepare_cpus <= 0 or min(self.num_cpus, self.num_gpus) < 0:
            raise ValueError("need prepare_cpus > 0, num_cpus >= 0 and num_gpus >= 0")
        if self.prepare_cpus == self.num_cpus and not self.num_gpus:
            raise ValueError("prepare_cpus must differ from num_cpus (or Ray Data fuses them)")


@dataclasses.dataclass(kw_only=True)
class EmbedConfig:
    model: str = ""  # a model folder, runs:/ID/model or models:/NAME@ALIAS
    data: str = ""  # curated shards: a folder or bucket prefix of .tar
    output: str = ""  # a folder or bucket prefix
    compute: ComputeConfig = dataclasses.field(default_factory=ComputeConfig)
    tracking: TrackingConfig = dataclasses.field(
        default_factory=lambda: TrackingConfig(experiment="mmray-embed")
    )

    def validate(self) -> None:
        missing = [f"--{k}" for k in ("model", "data", "output") if not getattr(self, k)]
        if missing:
            raise ValueError(f"{', '.join(missing)} required")


@functools.cache
def _model(uri: str) -> ModelRef:
    """The model resolved (and downloaded) once per process: the check and the job share it."""
    return resolve_model(uri)


class Embedder:
    """A Ray Data actor: the model, loaded once; each call embeds a batch and writes it as a
    part. Loads the resolved version, so an alias moved meanwhile changes nothing."""

    def __init__(self, model: str, parts: str, store: str) -> None:
        import os

        from mmcore.inference import Engine
        from mmcore.tracking import load

        os.environ["MLFLOW_TRACKING_URI"] = store  # an actor's cwd is not the driver's
        self.engine, self.model, self.parts = Engine(load(model)), model, parts

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        if not len(batch["key"]):
            return {"rows": np.zeros(0, np.int64)}
        inputs = (torch.from_numpy(batch[k]) for k in ("pixels", "input_ids", "attention_mask"))
        out = self.engine.embed_pairs(*inputs)
        width, keys = out["image_embedding"].shape[1], [str(k) for k in batch["key"]]
        columns = {"key": pa.array(keys)} | {
            name: pa.FixedSizeListArray.from_arrays(pa.array(out[name].ravel()), width)
            for name in ("image_embedding", "text_embedding")
        }
        captions = pa.array([str(c) for c in batch["caption"]])
        table = pa.table(columns | {"alignment": pa.array(out["alignment"]), "caption": captions})
        table = table.replace_schema_metadata({MODEL_KEY: self.model.encode()})
        storage.write_parquet(storage.join(self.parts, f"{min(keys)}.parquet"), table)
        return {"rows": np.asarray([len(table)])}


def _prepare(batch: dict[str, np.ndarray], done: frozenset[str], **kwargs: Any) -> dict:
    """Shard rows not embedded yet → model inputs, with their keys."""
    keep = np.asarray([str(k) not in done for k in batch["__key__"]], bool)
    if not keep.any():  # every batch has the same columns
        side, length = kwargs["image_size"], kwargs["context_length"]
        return {
            "pixels": np.zeros((0, 3, side, side), np.float32),
            "input_ids": np.zeros((0, length), np.int64),
            "attention_mask": np.zeros((0, length), np.int64),
            "key": np.zeros(0, str),
            "caption": np.zeros(0, str),
        }
    batch = {k: v[keep] for k, v in batch.items()}
    return preprocess(batch, **kwargs) | {
        "key": batch["__key__"],
        "caption": np.asarray(texts(batch)),
    }


def done_keys(parts: str, model: str) -> frozenset[str]:
    """The keys already embedded in ``parts``; an unreadable part (a write cut short on a
    local disk) is removed and its samples done again. Parts of another model: ConfigError."""
    keys: set[str] = set()
    for path in storage.list_files(parts, ".parquet") if storage.exists(parts) else []:
        try:
            table = storage.read_parquet(path, ["key"])
            wrote = written_by(path)
        except (OSError, pa.ArrowInvalid):
            log.warning("removing the unreadable part %s", path)
            storage.delete(path)
            continue
        if wrote != model:
            raise ConfigError(f"{parts} holds embeddings of {wrote or 'another model'}, not "
                              f"{model}: give another --output")  # fmt: skip
        keys.update(table.column("key").to_pylist())
    return frozenset(keys)


def work(cfg: EmbedConfig) -> dict[str, Any]:
    import ray.data

    ray_data_bars_off()  # ours instead
    ref, out = _model(cfg.model), storage.absolute(cfg.output)
    model_cfg = read_config(ref.folder)
    parts = storage.join(out, PARTS)
    done = done_keys(parts, ref.resolved)
    data = storage.absolute(cfg.data)
    curated = storage.join(data, "manifest.json")
    curated = storage.read_json(curated) if storage.exists(curated) else None
    with start_run(cfg.tracking, run_name=f"embed-{storage.name(out)}") as tracker:
        tracker.log_params(to_dict(cfg))
        tracker.set_tags({"mmray.model_uri": ref.resolved})  # lineage: the model version
        if curated is not None:
            tracker.log_dataset(data, storage.name(data), curated["digest"], "embedding")
        start, new = time.perf_counter(), 0
        ds = ray.data.read_webdataset(job.shard_paths(cfg.data, "data"), decoder=None)
        ds = ds.map_batches(_prepare, fn_kwargs={
            "done": done, "image_size": model_cfg.vision.image_size,
            "context_length": model_cfg.text.context_length,
        }, batch_size=cfg.compute.batch_size, batch_format="numpy",
           num_cpus=cfg.compute.prepare_cpus)  # fmt: skip
        written = ds.map_batches(
            Embedder, fn_constructor_kwargs={"model": ref.resolved, "parts": parts,
                                             "store": tracking_uri()},
            batch_size=cfg.compute.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=cfg.compute.concurrency),
            num_cpus=cfg.compute.num_cpus,
            num_gpus=cfg.compute.num_gpus,
        )  # fmt: skip
        total = curated["n_samples"] - len(done) if curated else 0
        with Progress("embed", total, "rows", from_start=True) as progress:
            for batch in written.iter_batches(batch_size=None, batch_format="numpy"):
                rows = int(batch["rows"].sum())
                new += rows
                progress.update(rows)
        wall = time.perf_counter() - start
        rows = len(done) + new
        manifest = {
            "model": cfg.model, "model_version": ref.resolved, "data": data, "rows": rows,
            "embed_dim": model_cfg.embed_dim, "fusion": model_cfg.fusion,
            "alignment": "itm" if VARIANTS[model_cfg.fusion].scores_pairs else "cosine",
            "parts": sorted(storage.name(p) for p in storage.list_files(parts, ".parquet")),
        }  # fmt: skip
        if curated is not None and rows != curated["n_samples"]:
            raise RuntimeError(f"{rows} rows embedded of the {curated['n_samples']} in {data}")
        storage.write_json(storage.join(out, MANIFEST), manifest)  # the commit marker
        metrics = {"rows": rows, "new_rows": new, "wall_s": wall, "rows_per_s": new / wall}
        tracker.log_metrics(metrics)
        tracker.log_dict(manifest, MANIFEST)
        return {"output": out, "run_id": tracker.run_id, "model_version": ref.resolved} | metrics


def parse_args(argv: list[str]) -> EmbedConfig:
    p = flags.parser("mmray embed", __doc__, flags.EMBED, "YAML config (optional)")
    args = p.parse_args(argv)
    return load_config(EmbedConfig, args.config, args.overrides, flags.values(args, flags.EMBED))


def check(cfg: EmbedConfig) -> None:
    """The model (resolved, and able to embed both modalities), the shards, the output and the
    tracking store, before Ray starts."""
    job.shard_paths(cfg.data, "data")
    job.check_output("output", cfg.output)
    storage.check_writable("output", cfg.output)
    job.check_tracking(cfg.tracking)
    embedding_model(cfg.model, "--model")


def embedding_model(uri: str, what: str) -> ModelRef:
    """The model ``uri`` (the ``what`` setting) names, resolved and downloaded once per
    process; ConfigError unless it names a model that embeds both images and text."""
    check_model(uri)  # what was not found where, before any download
    ref = _model(uri)
    model = read_config(ref.folder)
    if not VARIANTS[model.fusion].has_itc:
        raise ConfigError(
            f"{what}: model {uri} (fusion={model.fusion}) has no image and text embeddings "
            "(contrastive heads): use a late or hybrid model"
        )
    return ref


def need(cfg: EmbedConfig) -> job.Need:
    c = cfg.compute
    return job.Need(cpus=c.concurrency * c.num_cpus, gpus=c.concurrency * c.num_gpus,
                    data_cpus=1.0, dashboard=False)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return job.main("mmray embed", lambda: parse_args(argv), work, check, need)


if __name__ == "__main__":
    from pipelines.embed import main as module_main  # Ray pickles the module's classes by name

    sys.exit(module_main())
