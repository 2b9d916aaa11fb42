"""Curation steps as pure functions on ``dict[str, np.ndarray]`` batches.

Every row keeps flowing through every step: a rejected row keeps its ``status`` and
``error_message`` and is skipped by later steps, so the output accounts for every input row.
The Ray job (``pipelines/curate.py``) maps these over a Ray Dataset; tests call them directly.

    batch = clean_captions(batch, CaptionConfig())       # + caption, status, error_message
    batch = fetch_and_process(batch, FetchConfig(), ImageConfig())
    # + image (resized, encoded), sha256, phash, thumb, width, height, original_*

``CurateConfig`` is the job's config; ``summary`` and ``format_table`` its final report.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from mmcore.config import to_dict
from mmcore.data.alignment import AlignmentConfig
from mmcore.data.captions import CaptionConfig, caption_status, clean_caption
from mmcore.data.dedup import DedupConfig
from mmcore.data.fetch import FetchConfig, fetch_many
from mmcore.data.images import ImageConfig, ProcessedImage, Rejected, process_image, sha256
from mmcore.data.metadata import InputConfig
from mmcore.data.shards import SUCCESS
from mmcore.tracking import TrackingConfig

Batch = dict[str, np.ndarray]
SIZES = ("width", "height", "original_width", "original_height")
log = logging.getLogger(__name__)


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _ok(batch: Batch) -> list[int]:
    """Rows still in ``success``; also makes the status columns writable object arrays
    (Ray may hand strings over as fixed-width arrays that would truncate a longer status)."""
    for col in ("status", "error_message"):
        batch[col] = _objects(list(batch[col]))
    return [i for i, s in enumerate(batch["status"]) if s == SUCCESS]


def clean_captions(batch: Batch, cfg: CaptionConfig) -> Batch:
    """Normalise captions and start the accounting: ``status`` is set for every row."""
    captions = [clean_caption(c) for c in batch["caption"]]
    checks = [caption_status(c, cfg) for c in captions]
    batch["caption"] = _objects(captions)
    batch["status"] = _objects([c[0] if c else SUCCESS for c in checks])
    batch["error_message"] = _objects([c[1] if c else "" for c in checks])
    return batch


def fetch_and_process(
    batch: Batch, fetch_cfg: FetchConfig, image_cfg: ImageConfig, process_threads: int = 1
) -> Batch:
    """Download, then decode, check, hash, resize and encode every row still in ``success``.

    Images are processed on ``process_threads`` threads as soon as they arrive, so CPU work
    overlaps the downloads; 1 thread uses about one core.
    """
    rows = _ok(batch)
    n = len(batch["status"])
    ints = {c: np.zeros(n, np.int32) for c in SIZES}
    images: list[bytes | None] = [None] * n
    digests, hashes, thumbs = [""] * n, np.zeros(n, np.uint64), [b""] * n
    urls = [str(batch["url"][i]) for i in rows]
    results = fetch_many(urls, fetch_cfg, lambda data: _process(data, image_cfg), process_threads)
    for i, result in zip(rows, results, strict=True):
        if isinstance(result, Rejected):
            batch["status"][i], batch["error_message"][i] = result.status, result.message
            continue
        digests[i], out = result
        images[i], hashes[i], thumbs[i] = out.data, out.phash, out.thumb
        for col in SIZES:
            ints[col][i] = getattr(out, col)
    batch.update(ints, phash=hashes)
    batch.update(image=_objects(images), sha256=_objects(digests), thumb=_objects(thumbs))
    return batch


def _process(data: bytes, cfg: ImageConfig) -> tuple[str, ProcessedImage]:
    try:
        return sha256(data), process_image(data, cfg)
    except Rejected:
        raise
    except Exception as e:  # noqa: BLE001 - one odd image must not stop the job
        log.warning("unexpected error processing an image", exc_info=True)
        raise Rejected("failed_to_process", repr(e)) from e


# --- the curation job's config and summary ---------------------------------------------


@dataclasses.dataclass(kw_only=True)
class OutputConfig:
    path: str = ""  # output folder
    samples_per_shard: int = 10_000  # input rows per shard (img2dataset's default)


@dataclasses.dataclass(kw_only=True)
class ComputeConfig:
    """How the work is spread over Ray; changes speed, never the result."""

    # Input rows per task; fetch.threads download within it. A host that hangs keeps its
    # task open up to fetch.timeout_s after the request: a task of 512 rows has more work of
    # its own than that wait (256 left CPUs idle, docs/BENCHMARKS.md); fewer rows, finer
    # progress.
    rows_per_task: int = 512
    # CPUs reserved per processing task: two tasks per CPU, so that while one waits on slow
    # or hanging hosts (its last downloads), the other keeps the CPU busy
    num_cpus: float = 0.5
    process_threads: int = 1  # image-processing threads per task (~1 core each)
    concurrency: int | None = None  # max processing tasks at once (None: as CPUs allow)
    # Up to this many rows (with dedup.against's), dedup runs as one task, not as shuffles
    # whose start-up outweighs a small job's work; all-pairs near matching, O(rows²)
    dedup_one_task_rows: int = 20_000
    # The model stage (alignment.model): actors holding the model, and each one's resources
    model_actors: int = 1
    model_cpus: float = 1.0
    model_gpus: float = 0.0

    def validate(self) -> None:
        if self.rows_per_task < 1 or self.process_threads < 1 or self.model_actors < 1:
            raise ValueError("need rows_per_task, process_threads and model_actors >= 1")
        if self.num_cpus <= 0 or (self.concurrency is not None and self.concurrency < 1):
            raise ValueError("need num_cpus > 0 and concurrency >= 1 (or null: as CPUs allow)")
        if min(self.dedup_one_task_rows, self.model_cpus, self.model_gpus) < 0:
            raise ValueError("need dedup_one_task_rows, model_cpus and model_gpus >= 0")


@dataclasses.dataclass(kw_only=True)
class CurateConfig:
    input: InputConfig = dataclasses.field(default_factory=InputConfig)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)
    captions: CaptionConfig = dataclasses.field(default_factory=CaptionConfig)
    fetch: FetchConfig = dataclasses.field(default_factory=FetchConfig)
    image: ImageConfig = dataclasses.field(default_factory=ImageConfig)
    dedup: DedupConfig = dataclasses.field(default_factory=DedupConfig)
    alignment: AlignmentConfig = dataclasses.field(default_factory=AlignmentConfig)
    compute: ComputeConfig = dataclasses.field(default_factory=ComputeConfig)
    tracking: TrackingConfig = dataclasses.field(
        default_factory=lambda: TrackingConfig(experiment="mmray-curate")
    )

    def validate(self) -> None:
        if not self.input.path or not self.output.path:
            raise ValueError("input.path (--input) and output.path (--output) are required")
        if self.output.samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        if self.dedup.semantic and not self.alignment.model:
            raise ValueError("dedup.semantic compares the image embeddings of alignment.model: "
                             "give one")  # fmt: skip

    def identity(self) -> dict[str, Any]:
        """The settings that determine the output; a resumed run must match them."""
        d = to_dict(self)
        for section in ("compute", "tracking"):
            d.pop(section)
        d["fetch"].pop("threads")  # speed only
        return d


def summary(
    manifest: dict, failures: list[tuple[str, dict[str, int]]], processed: int, elapsed: float,
    run_id: str | None,
) -> dict[str, Any]:  # fmt: skip
    """The job's result; ``failures``: (host, counts by status) of the rows not kept, most
    first (``mmcore.data.shards.failures_by_host``), of which the top 10 are kept here."""
    return {
        "n_input": manifest["n_input"],
        "n_samples": manifest["n_samples"],
        "n_shards": len(manifest["shards"]),
        "status_counts": manifest["status_counts"],
        "top_failing_hosts": [
            {"host": host, "rows": sum(counts.values()), "by_status": counts}
            for host, counts in failures[:10]
        ],
        "processed": processed,
        "elapsed_s": round(elapsed, 3),
        "samples_per_s": round(processed / elapsed, 2) if elapsed else None,
        "digest": manifest["digest"],
        "run_id": run_id,
    }


def format_table(summary: dict[str, Any]) -> str:
    """The final summary table: counts by status, then throughput."""
    n = summary["n_input"] or 1
    lines = [f"{'status':<22}{'rows':>10}{'share':>9}", "-" * 41]
    for status, count in sorted(summary["status_counts"].items(), key=lambda kv: -kv[1]):
        lines.append(f"{status:<22}{count:>10}{count / n:>9.1%}")
    lines += ["-" * 41, f"{'input rows':<22}{summary['n_input']:>10}"]
    lines.append(f"{'samples in tars':<22}{summary['n_samples']:>10}")
    if summary["samples_per_s"]:
        lines.append(f"{'samples/s':<22}{summary['samples_per_s']:>10.1f}")
    if summary["top_failing_hosts"]:
        lines += ["", "rows not kept, by host (top 10; all in failures_by_host.csv):"]
        for h in summary["top_failing_hosts"]:
            reasons = ", ".join(f"{status} {n}" for status, n in h["by_status"].items())
            lines.append(f"  {h['host']:<30}{h['rows']:>8}  {reasons}")
    return "\n".join(lines)
