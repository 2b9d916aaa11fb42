"""Curation job: (url, caption) metadata → clean WebDataset shards, on Ray Data.

    mmray curate --input meta.parquet --output shards/ --image-size 256 --resize-mode center_crop
    ray job submit --working-dir . -- python -m pipelines.curate --input ... --output ...

Stages (every input row is accounted for in exactly one shard parquet row):
  1. plan      driver, streaming pyarrow: validate columns, key rows, write shard inputs
  2. stage     Ray Data: clean captions → fetch → decode/check/hash/resize/encode → pieces
  2b. score    with alignment.model: an actor pool scores every decoded row and embeds its
               image (pipelines/alignment.py)
  3. dedup     Ray Data group-bys over the hash columns (pipelines/dedup.py): exact (sha256)
               and near (phash band + colour), also against earlier outputs (dedup.against);
               then, with alignment.model, the alignment filter and semantic dedup
               (dedup.semantic)
  4. finalize  Ray Data over shards: NNNNN.tar, NNNNN.parquet, NNNNN_stats.json (atomic)
  5. manifest  manifest.json, the summary table, the MLflow run
Rerunning the same command resumes: staged and finished shards are kept, the rest is redone,
and the result equals that of an uninterrupted run (dedup keeps the smallest key). Input and
output may be local or in object storage (``s3://bucket/prefix``, ``mmcore.storage``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from typing import Any

from mmcore import storage
from mmcore.config import ConfigError, load_config, to_dict
from mmcore.data.curate import (
    CurateConfig,
    clean_captions,
    fetch_and_process,
    format_table,
    summary,
)
from mmcore.data.metadata import check_input, plan_shards, read_parts, shard_key
from mmcore.data.shards import (
    FAILURES,
    MANIFEST,
    build_manifest,
    failures_by_host,
    failures_csv,
    finalize_shard,
    finished_shards,
    piece_paths,
    remove_partial_files,
    staged_rows,
    write_pieces,
)
from mmcore.tracking import start_run
from pipelines import alignment, flags, job
from pipelines.dedup import deduplicate, prior_shards, read_decisions
from pipelines.progress import Progress, ray_data_bars_off

log = logging.getLogger(__name__)


# --- Ray wrappers: thin, each maps an mmcore function over the dataset ---------------------


def _stage(cfg: CurateConfig, parts: list[str], pieces: str, total: int) -> None:
    """Stage 2 over the given input parts (``total`` rows): every row ends in a parquet
    piece. Progress: rows done, rate, ETA and how many succeeded so far (before dedup)."""
    import ray.data

    # A single-operator pipeline: per-operator reservation only holds CPUs back from it
    # (with 2 CPUs it ran one task at a time); let the operator use every CPU it can.
    context = ray_data_bars_off()  # ours reports rows (below); read when the dataset is built
    context.op_resource_reservation_enabled = False
    # One task per planned part: every stage takes the whole part as its batch. Two traps
    # in Ray 2.60 that this avoids: read_parquet coalesces small files into one block, and
    # fused map_batches bundle max(batch_size) input blocks into each task.
    args = {
        "batch_size": None,
        "num_cpus": cfg.compute.num_cpus,
        "concurrency": cfg.compute.concurrency,
    }
    ds = (
        ray.data.from_items([{"part": p} for p in parts], override_num_blocks=len(parts))
        .map_batches(read_parts, batch_format="numpy", **args)
        .map_batches(clean_captions, fn_kwargs={"cfg": cfg.captions}, batch_format="numpy", **args)
        .map_batches(
            fetch_and_process,
            fn_kwargs={
                "fetch_cfg": cfg.fetch,
                "image_cfg": cfg.image,
                "process_threads": cfg.compute.process_threads,
            },
            batch_format="numpy",
            **args,
        )
        .map_batches(write_pieces, fn_kwargs={"pieces_dir": pieces}, batch_format="pyarrow", **args)
    )
    with Progress("curate", total=total, unit="rows", from_start=True) as progress:
        kept = 0
        for counts in ds.iter_batches(batch_size=None):  # streams; the pieces are on disk
            kept += int(counts["kept"].sum())
            progress.update(int(counts["rows"].sum()), kept=kept)


def _finalize_row(
    row: dict[str, Any], pieces: str, decisions: str, out: str, image_ext: str,
    scores: str | None,
) -> dict:  # fmt: skip
    shard = int(row["shard"])
    aligned = None if scores is None else alignment.read_scores(scores, shard)
    finalize_shard(shard, pieces, out, read_decisions(decisions, shard), image_ext, aligned)
    return {"shard": row["shard"]}


def _finalize(
    cfg: CurateConfig, shards: list[int], decisions: str, pieces: str, scores: str | None
) -> None:
    import ray.data

    items = [{"shard": s} for s in shards]
    out = storage.absolute(cfg.output.path)
    kwargs = {"pieces": pieces, "decisions": decisions, "out": out,
              "image_ext": cfg.image.encode_format, "scores": scores}  # fmt: skip
    ds = ray.data.from_items(items).map(
        _finalize_row, fn_kwargs=kwargs, num_cpus=cfg.compute.num_cpus
    )
    for _ in ds.iter_rows():
        pass


# --- the job ------------------------------------------------------------------------------


def run(cfg: CurateConfig) -> dict[str, Any]:
    """Curate ``cfg.input`` into shards under ``cfg.output.path``; returns the summary."""
    out = storage.absolute(cfg.output.path)
    work, identity = storage.join(out, "_work"), cfg.identity()
    manifest_path = storage.join(out, MANIFEST)
    if storage.exists(manifest_path):
        manifest = storage.read_json(manifest_path)
        _check_same(manifest["config"], identity, manifest_path)
        log.info("%s is complete already; nothing to do", out)
        failures = failures_by_host(list(finished_shards(out).values()))
        return summary(manifest, failures, processed=0, elapsed=0.0, run_id=None)

    t0 = time.perf_counter()
    if n := remove_partial_files(out):
        log.info("removed %d partial files of an interrupted run", n)
    plan = _load_or_plan(cfg, work, identity)
    pieces = storage.join(work, "pieces")
    processed = _stage_missing(cfg, plan, pieces)
    model = _alignment_model(cfg)
    scores = storage.join(work, "scores") if model else None
    if model:
        t1 = time.perf_counter()
        remove_partial_files(scores)
        alignment.score_pieces(cfg, pieces, scores, model)
        log.info("scored in %.1fs", time.perf_counter() - t1)

    done = finished_shards(out)
    if todo := [s for s in range(len(plan["shard_rows"])) if s not in done]:
        t1 = time.perf_counter()
        width = len(shard_key(0, 0, cfg.output.samples_per_shard))
        decisions = deduplicate(
            cfg.dedup, piece_paths(pieces), width, cfg.dedup.against_uris, work, plan["n_rows"],
            cfg.compute.dedup_one_task_rows,
        )  # fmt: skip
        if model:
            decided = alignment.decide(cfg.alignment, cfg.dedup, scores, decisions)
            storage.write_json(storage.join(work, alignment.SUMMARY), decided)
        log.info("dedup in %.1fs", time.perf_counter() - t1)
        t1 = time.perf_counter()
        _finalize(cfg, todo, decisions, pieces, scores)
        log.info("finalized shards in %.1fs", time.perf_counter() - t1)

    shards = [stats for _, stats in sorted(finished_shards(out).items())]
    manifest = build_manifest(identity, shards)
    if manifest["n_input"] != plan["n_rows"]:
        raise RuntimeError(f"accounting: {manifest['n_input']} rows written, {plan['n_rows']} read")
    if model:  # the resolved version: an alias may move on
        summary_ = storage.read_json(storage.join(work, alignment.SUMMARY))
        manifest["alignment"] = {"model_version": model} | summary_
    failures = failures_by_host(shards)
    storage.write_text(storage.join(out, FAILURES), failures_csv(failures))
    storage.write_json(manifest_path, manifest)  # last: the dataset's commit marker
    storage.delete_dir(work)
    elapsed = time.perf_counter() - t0
    run_id = _track(cfg, manifest, processed, elapsed)
    return summary(manifest, failures, processed, elapsed, run_id)


def _alignment_model(cfg: CurateConfig) -> str | None:
    """The resolved version of ``alignment.model`` (None: no model stage)."""
    if not cfg.alignment.model:
        return None
    from pipelines.embed import embedding_model  # torch: only a job with a model needs it

    return embedding_model(cfg.alignment.model, "alignment.model").resolved


def _stage_missing(cfg: CurateConfig, plan: dict[str, Any], pieces: str) -> int:
    """Stage every shard not fully staged yet (a partly staged one is redone whole)."""
    remove_partial_files(pieces)
    staged = staged_rows(pieces)
    todo = {s for s, n in enumerate(plan["shard_rows"]) if staged.get(s) != n}
    for shard in todo:
        for path in piece_paths(pieces, shard):
            storage.delete(path)
    processed = sum(plan["shard_rows"][s] for s in todo)
    log.info(
        "curate: %d input rows, %d shards, %d rows to process",
        plan["n_rows"],
        len(plan["shard_rows"]),
        processed,
    )
    if todo:
        t0 = time.perf_counter()
        parts = [p for p in plan["parts"] if int(storage.name(p)[:5]) in todo]
        _stage(cfg, parts, pieces, processed)
        log.info("staged %d rows in %.1fs", processed, time.perf_counter() - t0)
    staged = staged_rows(pieces)
    missing = sorted(s for s, n in enumerate(plan["shard_rows"]) if staged.get(s) != n)
    if missing:
        raise RuntimeError(f"staging lost rows of shards {missing}")
    return processed


def _check_same(previous: dict, identity: dict, where: str) -> None:
    if json.loads(json.dumps(previous, default=str)) != json.loads(
        json.dumps(identity, default=str)
    ):
        raise ConfigError(
            f"{where} was made with a different config; use a new --output folder "
            "(or delete the old one) to curate with these settings"
        )


def _load_or_plan(cfg: CurateConfig, work: str, identity: dict) -> dict[str, Any]:
    """Stage 1, or its saved result when resuming the same command."""
    plan_path = storage.join(work, "plan.json")
    if storage.exists(plan_path):
        saved = storage.read_json(plan_path)
        _check_same(saved["config"], identity, plan_path)
        return saved
    storage.delete_dir(work)  # a plan that never finished: start over
    t0 = time.perf_counter()
    plan = plan_shards(
        cfg.input, storage.join(work, "inputs"), cfg.output.samples_per_shard,
        cfg.compute.rows_per_task,
    )  # fmt: skip
    saved = dataclasses.asdict(plan) | {"config": identity}
    storage.write_json(plan_path, saved)
    log.info("planned %d rows in %.1fs", plan.n_rows, time.perf_counter() - t0)
    return saved


def _track(cfg: CurateConfig, manifest: dict, processed: int, elapsed: float) -> str | None:
    out = storage.absolute(cfg.output.path)
    with start_run(cfg.tracking, run_name=f"curate-{storage.name(out)}") as tracker:
        tracker.log_params(to_dict(cfg))
        metrics = {f"curate/count_{status}": n for status, n in manifest["status_counts"].items()}
        metrics |= {
            "curate/n_input": manifest["n_input"],
            "curate/n_samples": manifest["n_samples"],
            "curate/n_shards": len(manifest["shards"]),
            "curate/elapsed_s": elapsed,
            "curate/samples_per_s": processed / elapsed if elapsed else 0.0,
        }
        if model := manifest.get("alignment"):
            tracker.set_tags({"mmray.alignment_model": model["model_version"]})
            if model["cutoff"] is not None:
                metrics["curate/alignment_cutoff"] = model["cutoff"]
        tracker.log_metrics(metrics)
        for artifact in (MANIFEST, FAILURES):  # read back: the output may be in a bucket
            tracker.log_text(storage.read_text(storage.join(out, artifact)), artifact)
        tracker.log_dataset(out, storage.name(out), manifest["digest"], context="curated")
        return tracker.run_id


# --- command line -------------------------------------------------------------------------


def parse_args(argv: list[str]) -> CurateConfig:
    p = flags.parser("mmray curate", __doc__, flags.CURATE, "YAML config (curate*.yaml)")
    args = p.parse_args(argv)
    return load_config(CurateConfig, args.config, args.overrides, flags.values(args, flags.CURATE))


def check(cfg: CurateConfig) -> None:
    """A bad input, output path or tracking store fails before Ray starts: a missing file,
    bucket or prefix, and credentials the store refuses, too."""
    job.check_input("input.path", cfg.input.path)
    check_input(cfg.input)
    job.check_output("output.path", cfg.output.path)
    storage.check_writable("output.path", cfg.output.path)
    for uri in cfg.dedup.against_uris:
        prior_shards(uri)
    job.check_tracking(cfg.tracking)
    _alignment_model(cfg)


def work(cfg: CurateConfig) -> dict[str, Any]:
    result = run(cfg)
    print(format_table(result), file=sys.stderr)
    return result


def need(cfg: CurateConfig) -> job.Need:
    # Room for one processing task at least; Ray Data needs no dashboard
    c = cfg.compute
    if cfg.alignment.model:
        return job.Need(cpus=max(c.num_cpus, c.model_cpus), gpus=c.model_gpus, dashboard=False)
    return job.Need(cpus=c.num_cpus, dashboard=False)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return job.main("mmray curate", lambda: parse_args(argv), work, check, need)


if __name__ == "__main__":
    # Run the importable module, not __main__: Ray pickles __main__'s classes by value, and
    # their string annotations would not resolve on the workers.
    from pipelines.curate import main as module_main

    sys.exit(module_main())
