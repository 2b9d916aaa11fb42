"""The curation job's model stage on Ray: alignment scores and semantic dedup
(``mmcore.data.alignment``).

  score    an actor pool (``compute.model_actors``, each ``compute.model_cpus`` CPUs and
           ``compute.model_gpus`` GPUs) holds the model; each call takes one staged piece,
           scores its decoded rows and writes ``_work/scores/<piece>`` (key, alignment,
           image_embedding), its file metadata naming the model version. A resumed job
           scores only the pieces without one.
  decide   one task reads the scores and the hash dedup's decisions and writes the
           ``low_alignment`` and ``semantic_duplicate`` decisions per shard, beside them.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmcore import storage
from mmcore.config import ConfigError
from mmcore.data import alignment
from mmcore.data.curate import CurateConfig
from mmcore.data.dedup import DedupConfig
from mmcore.data.shards import SUCCESS, piece_paths
from mmcore.tracking import tracking_uri
from pipelines.dedup import write_decisions
from pipelines.progress import Progress

log = logging.getLogger(__name__)
SUMMARY = "alignment.json"
MODEL_KEY = b"mmray.model"  # a scores file's metadata: the model version (as mmray embed's)


def written_by(path: str) -> str:
    """The model version a parquet file's metadata names (``MODEL_KEY``; "" for none)."""
    return (storage.read_parquet_schema(path).metadata or {}).get(MODEL_KEY, b"").decode()


class Scorer:
    """A Ray Data actor: the model, loaded once; each call scores staged pieces."""

    def __init__(self, model: str, scores: str, store: str, batch_size: int) -> None:
        import os

        from mmcore.inference import Engine
        from mmcore.tracking import load

        os.environ["MLFLOW_TRACKING_URI"] = store  # an actor's cwd is not the driver's
        self.engine, self.model, self.scores = Engine(load(model)), model, scores
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = []
        for piece in batch["piece"]:
            table = storage.read_parquet(str(piece), ["key", "status", "image", "caption"])
            table = table.filter(pc.equal(table.column("status"), SUCCESS))
            cols = {c: table.column(c).to_pylist() for c in ("key", "image", "caption")}
            scored = alignment.score(self.engine, cols["key"], cols["image"], cols["caption"],
                                     self.batch_size)  # fmt: skip
            scored = scored.replace_schema_metadata({MODEL_KEY: self.model.encode()})
            storage.write_parquet(storage.join(self.scores, storage.name(str(piece))), scored)
            rows.append(len(scored))
        return {"rows": np.asarray(rows, np.int64)}


def score_pieces(cfg: CurateConfig, pieces: str, scores: str, model: str) -> None:
    """Score every staged piece that has no scores of ``model`` (a resolved version) yet."""
    import ray.data

    done = set()
    for path in storage.list_files(scores, ".parquet") if storage.exists(scores) else []:
        if (wrote := written_by(path)) != model:
            raise ConfigError(
                f"{path} was scored by {wrote or 'another model'}, but alignment.model is now "
                f"{model} (an alias moved?): use a new --output, or name the version"
            )
        done.add(storage.name(path))
    todo = [p for p in piece_paths(pieces) if storage.name(p) not in done]
    if not todo:
        return
    c = cfg.compute
    written = ray.data.from_items(
        [{"piece": p} for p in todo], override_num_blocks=len(todo)
    ).map_batches(
        Scorer, fn_constructor_kwargs={"model": model, "scores": scores, "store": tracking_uri(),
                                       "batch_size": cfg.alignment.batch_size},
        batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=c.model_actors),
        num_cpus=c.model_cpus, num_gpus=c.model_gpus,
    )  # fmt: skip
    with Progress("score", len(todo), "pieces") as progress:
        for batch in written.iter_batches(batch_size=None, batch_format="numpy"):
            progress.update(len(batch["rows"]))


def decide(
    cfg: alignment.AlignmentConfig, dedup: DedupConfig, scores: str, decisions: str
) -> dict[str, Any]:
    """The model's decisions over the whole job, in one Ray task: see the module's doc."""
    import ray

    summary = ray.get(ray.remote(_decide).remote(cfg, dedup, scores, decisions))
    log.info("alignment: %s", summary)
    return summary


def _decide(
    cfg: alignment.AlignmentConfig, dedup: DedupConfig, scores: str, decisions: str
) -> dict[str, Any]:
    columns = ["key", "alignment"] + (["image_embedding"] if dedup.semantic else [])
    files = storage.list_files(scores, ".parquet") if storage.exists(scores) else []
    counts = dict.fromkeys((alignment.LOW_ALIGNMENT, alignment.SEMANTIC_DUPLICATE), 0)
    if not files:  # no row decoded
        return {"scored": 0, "pool": 0, "cutoff": None} | counts
    table = pa.concat_tables(storage.read_parquet(p, columns) for p in files).sort_by("key")
    dropped = [storage.read_parquet(p, ["key"]) for p in storage.list_files(decisions, ".parquet")]
    dropped = pa.concat_tables(dropped).column("key") if dropped else pa.array([], pa.string())
    pool = table.filter(pc.invert(pc.is_in(table.column("key"), dropped)))
    keys = np.asarray(pool.column("key").to_pylist(), object)
    scores_ = pool.column("alignment").to_numpy()
    keep, cutoff = alignment.keep_mask(scores_, cfg)
    low = np.flatnonzero(~keep)
    messages = [f"alignment {scores_[i]:.4f} below the cut-off {cutoff:.4f}" for i in low]
    _write(decisions, "alignment.parquet", keys[low], alignment.LOW_ALIGNMENT, None, messages)
    counts[alignment.LOW_ALIGNMENT] = len(low)
    if dedup.semantic:
        kept = np.flatnonzero(keep)
        vectors = pool.column("image_embedding").combine_chunks().flatten().to_numpy()
        vectors = vectors.reshape(len(pool), -1)
        rows, of = alignment.semantic_duplicates(vectors[kept], dedup.semantic_threshold)
        _write(decisions, "semantic.parquet", keys[kept[rows]], alignment.SEMANTIC_DUPLICATE,
               keys[kept[of]], None)  # fmt: skip
        counts[alignment.SEMANTIC_DUPLICATE] = len(rows)
    return {"scored": len(table), "pool": len(pool), "cutoff": cutoff} | counts


def _write(
    folder: str, name: str, keys: np.ndarray, status: str, of: np.ndarray | None,
    messages: list[str] | None,
) -> None:  # fmt: skip
    """Decisions as one file per shard (``write_decisions``); keys start with their shard's
    five digits."""
    shards = np.asarray([int(k[:5]) for k in keys], np.int64)
    for shard in np.unique(shards):
        rows = np.flatnonzero(shards == shard)
        write_decisions(
            folder, int(shard), name, status, keys[rows].tolist(),
            [None] * len(rows) if of is None else of[rows].tolist(),
            None if messages is None else [messages[i] for i in rows],
        )  # fmt: skip


def read_scores(scores: str, shard: int) -> dict[str, float]:
    """One shard's alignment scores: ``{key: alignment}``."""
    out: dict[str, float] = {}
    for path in storage.list_files(scores, ".parquet", prefix=f"{shard:05d}_"):
        table = storage.read_parquet(path, ["key", "alignment"])
        keys, scores = table.column("key").to_pylist(), table.column("alignment").to_pylist()
        out.update(zip(keys, scores, strict=True))
    return out
