"""Every job's command line in one table: a flag is a shorthand for one dotted config key.

    mmray train --config tiny.yaml --data shards/ optim.lr=3e-4
    # the same as: mmray train --config tiny.yaml data.path=shards/ optim.lr=3e-4

Flags set typed values (a path named ``123`` stays a string); ``key.sub=value`` overrides are
parsed as YAML and win over flags, which win over the ``--config`` file. ``mmray --help``
and each subcommand's ``--help`` list the flags from here. No heavy imports: ``--help``
stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).resolve().parents[1]  # holds pipelines/configs/, installed or not


@dataclasses.dataclass(frozen=True)
class Flag:
    name: str  # "--data"
    key: str  # the config key it sets: "data.path"
    help: str
    type: Callable[[str], Any] = str
    repeat: bool = False  # repeatable; the key gets the list


# img2dataset's flag names, for its users.
CURATE = [
    Flag("--input", "input.path", "metadata (parquet, csv, tsv, jsonl), a file or folder"),
    Flag("--output", "output.path", "where the shards go"),
    Flag("--input-format", "input.format", "parquet, csv, tsv or jsonl (default: by suffix)"),
    Flag("--url-col", "input.url_col", "the URL column"),
    Flag("--caption-col", "input.caption_col", "the caption column"),
    Flag("--qa", "input.qa", "question-answer pairs by url (url, question, answer, type)"),
    Flag("--image-size", "image.image_size", "side of the stored images", int),
    Flag("--resize-mode", "image.resize_mode", "center_crop, border, keep_ratio or no"),
    Flag("--encode-format", "image.encode_format", "jpg or webp"),
    Flag("--encode-quality", "image.encode_quality", "JPEG/WebP quality", int),
    Flag("--samples-per-shard", "output.samples_per_shard", "samples per .tar", int),
    Flag("--timeout", "fetch.timeout_s", "seconds per download", float),
    Flag("--retries", "fetch.retries", "retries of a failed download", int),
    Flag("--threads", "fetch.threads", "concurrent downloads per task", int),
]
TRAIN = [
    Flag("--data", "data.path", "folder of curated shards, or one .tar"),
    Flag("--val-data", "data.val_path", "curated shards for validation"),
    Flag("--zeroshot", "eval.zeroshot", "zero-shot folder DIR/<class>/<images>", repeat=True),
]
# A sweep's flags set its trials' training config.
TUNE = [dataclasses.replace(f, key=f"trial.{f.key}") for f in TRAIN]
SERVE = [
    Flag("--model", "model.uri", "folder, runs:/ID/model or models:/NAME@ALIAS"),
    Flag("--index", "index", "curated shards, or a search index (mmray index) to search over"),
]
EMBED = [
    Flag("--model", "model", "folder, runs:/ID/model or models:/NAME@ALIAS"),
    Flag("--data", "data", "folder of curated shards, or one .tar"),
    Flag("--output", "output", "where the embedding parquet goes"),
]
INDEX = [
    Flag("--embeddings", "embeddings", "a finished mmray embed output"),
    Flag("--output", "output", "where the index goes"),
]
JOBS = {"curate": CURATE, "train": TRAIN, "tune": TUNE, "serve": SERVE, "embed": EMBED,
        "index": INDEX}  # fmt: skip


def config_path(path: str, *folders: str | Path) -> str:
    """A config file from the working directory; else the same relative path under each of
    ``folders``, then in mmray's own tree, so the shipped ``pipelines/configs/...`` YAMLs load
    from any folder. Found nowhere: ``path`` as given (loading it says so)."""
    if Path(path).exists():
        return path
    found = (Path(f) / path for f in (*folders, SOURCE))
    return str(next((p for p in found if p.is_file()), path))


def parser(
    prog: str, doc: str, flags: Sequence[Flag], config_help: str, config: str | None = None
) -> argparse.ArgumentParser:
    """``--config``, the flags, then ``key.sub=value`` overrides."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    p.add_argument("--config", default=config, type=config_path, help=config_help)
    for f in flags:
        action = "append" if f.repeat else "store"
        metavar = f.name.lstrip("-").replace("-", "_").upper()
        p.add_argument(f.name, dest=f.key, type=f.type, action=action, metavar=metavar,
                       help=f"{f.help} (sets {f.key})")  # fmt: skip
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="any config key")
    return p


def values(args: argparse.Namespace, flags: Sequence[Flag]) -> dict[str, Any]:
    """The flags given, as {dotted key: value}."""
    return {f.key: v for f in flags if (v := getattr(args, f.key)) is not None}


def usage() -> str:
    """Each job's flags and the keys they set, for ``mmray --help``."""
    lines = []
    for job, flags in JOBS.items():
        lines.append(f"  mmray {job}:")
        lines += [f"    {f.name:<20} {f.key:<26} {f.help}" for f in flags]
    return "\n".join(lines)
