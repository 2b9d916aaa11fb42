"""Curation by a model (alignment.model): a model trained on a clean crawl filters a noisy
one and drops its semantic duplicates, on the session's real Ray with the model resolved from
a real MLflow server's registry; a run killed with SIGKILL resumes to the same bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mmcore.config import load_config
from mmcore.data import alignment
from mmcore.data.images import ImageConfig, process_image
from mmcore.data.inputs import preprocess
from mmcore.data.sample import make_sample_data
from mmcore.export import save_model
from mmcore.inference import Engine
from mmcore.losses.contrastive import clip_loss
from mmcore.models.model import ModelConfig, build_model
from mmcore.models.towers import TextConfig
from mmcore.tracking import TrackingConfig, load, log_model, start_run
from pipelines.curate import CurateConfig, main, run
from tests.helpers import sigkill_when

pytestmark = pytest.mark.integration
NAME = "test-filter"
SCORER = f"models:/{NAME}@scorer"


def _fit(pairs: list[tuple[bytes, str]], steps: int = 200) -> torch.nn.Module:
    """A small late-fusion model trained with the CLIP loss on clean pairs, in this process
    (~45 s): enough to tell a caption of the image from one of another scene (3-7 % of the
    kept rows mismatched in four seeds, against 30 % planted)."""
    torch.manual_seed(1)
    model = build_model(ModelConfig(fusion="late", text=TextConfig(kind="transformer")))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        rows = [pairs[i] for i in rng.choice(len(pairs), 32, replace=False)]
        batch = {"jpg": [r[0] for r in rows], "txt": [r[1] for r in rows],
                 "__key__": [str(i) for i in range(32)]}  # fmt: skip
        inputs = preprocess(batch, 64, 32)
        out = model(*(torch.from_numpy(inputs[k]) for k in ("pixels", "input_ids",
                                                           "attention_mask")))  # fmt: skip
        loss = clip_loss(out.image_embeds, out.text_embeds, out.logit_scale)["clip"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def scorer(mlflow_server, tmp_path_factory) -> Iterator[str]:
    """Version 1: a model trained on a clean crawl's images as curation resizes them (alias
    scorer); version 2: an early-fusion model, which has no embeddings."""
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server.url
    folder = tmp_path_factory.mktemp("models")
    make_sample_data(folder / "clean", n=1000, seed=3, zeroshot_per_class=1)
    meta = pq.read_table(folder / "clean" / "metadata.parquet").to_pylist()
    size = ImageConfig(image_size=64, resize_mode="center_crop")
    pairs = [(process_image(Path(r["url"]).read_bytes(), size).data, r["caption"])
             for r in meta if r["kind"] == "clean"]  # fmt: skip
    torch.manual_seed(1)
    early = build_model(ModelConfig(fusion="early", text=TextConfig(kind="transformer")))
    for version, model in enumerate([_fit(pairs), early], start=1):
        with start_run(TrackingConfig(experiment="test-filter")):
            log_model(save_model(model, folder / f"v{version}"), registered_name=NAME)
    mlflow.MlflowClient(mlflow_server.url).set_registered_model_alias(NAME, "scorer", "1")
    yield SCORER
    del os.environ["MLFLOW_TRACKING_URI"]


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> Path:
    """Another crawl than the scorer's: 30 % of its clean images carry another scene's caption."""
    out = tmp_path_factory.mktemp("noisy")
    make_sample_data(out, n=300, seed=2, noisy=0.3, zeroshot_per_class=1)
    return out


def config(noisy: Path, out: Path, *extra: str) -> CurateConfig:
    overrides = [
        f"input.path={noisy}/metadata.parquet", f"output.path={out}",
        "output.samples_per_shard=100", "image.image_size=64", "compute.rows_per_task=50",
        "tracking.experiment=test-filter", *extra,
    ]  # fmt: skip
    return load_config(CurateConfig, None, overrides)


FILTER = (f"alignment.model={SCORER}", "alignment.keep_fraction=0.7")


@pytest.fixture(scope="module")
def filtered(ray_cluster, scorer, noisy, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("filtered") / "shards"
    return out, run(config(noisy, out, *FILTER))


def _rows(out: Path) -> list[dict]:
    return pa.concat_tables(pq.read_table(p) for p in sorted(out.glob("0*.parquet"))).to_pylist()


def test_the_filter_drops_planted_mismatches_and_accounts_for_every_row(
    filtered, noisy, mlflow_server
) -> None:
    out, summary = filtered
    rows = _rows(out)
    assert len(rows) == summary["n_input"] == 300  # every input row, once
    decoded = [r for r in rows if r["alignment"] is not None]
    pool = [r for r in decoded if r["status"] not in ("duplicate", "near_duplicate")]
    kept = [r for r in rows if r["status"] == "success"]
    low = [r for r in rows if r["status"] == "low_alignment"]
    assert len(kept) == int(np.ceil(0.7 * len(pool))) and len(kept) + len(low) == len(pool)
    scored = {"success", "low_alignment", "duplicate", "near_duplicate"}  # every decoded row
    assert all((r["alignment"] is not None) == (r["status"] in scored) for r in rows)
    cutoff = min(r["alignment"] for r in kept)
    assert all(r["alignment"] <= cutoff for r in low)
    assert all(r["error_message"].startswith(f"alignment {r['alignment']:.4f} below") for r in low)

    planted = [r for r in rows if r["kind"] == "noisy"]
    mismatched_kept = sum(r["kind"] == "noisy" for r in kept) / len(kept)
    assert len(planted) / len(pool) > 0.25 and mismatched_kept < 0.10, mismatched_kept
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["alignment"]["model_version"] == f"models:/{NAME}/1"
    assert manifest["status_counts"]["low_alignment"] == len(low)

    run_ = mlflow.MlflowClient(mlflow_server.url).get_run(summary["run_id"])
    assert run_.data.tags["mmray.alignment_model"] == f"models:/{NAME}/1"
    assert run_.data.metrics["curate/count_low_alignment"] == len(low)
    assert run_.data.params["alignment.model"] == SCORER


def test_semantic_dedup_drops_planted_copies(ray_cluster, scorer, noisy, tmp_path) -> None:
    """Hash dedup off: the crawl's byte-identical and resized copies must be found by their
    embeddings alone, each the duplicate of a kept row."""
    cfg = config(
        noisy,
        tmp_path / "shards",
        f"alignment.model={SCORER}",
        "dedup.semantic=true",
        "dedup.semantic_threshold=0.995",
        "dedup.exact=false",
        "dedup.near=false",
    )
    summary = run(cfg)
    rows = _rows(tmp_path / "shards")
    assert len(rows) == 300
    status = {r["key"]: r["status"] for r in rows}
    # A byte-identical copy embeds as its original does: dropped, whatever became of that.
    # A resized one may stay where its original went as the duplicate of a row it is not
    # close to itself (the key-order rule's chains, as in the hash dedup).
    copies = {kind: [status[r["key"]] for r in rows if r["kind"] == kind]
              for kind in ("duplicate", "near_duplicate")}  # fmt: skip
    assert copies["duplicate"] == ["semantic_duplicate"] * 6
    assert copies["near_duplicate"].count("semantic_duplicate") >= 4, copies
    semantic = [r for r in rows if r["status"] == "semantic_duplicate"]
    assert all(status[r["duplicate_of"]] == "success" and r["duplicate_of"] < r["key"]
               for r in semantic)  # fmt: skip
    assert summary["status_counts"]["semantic_duplicate"] == len(semantic)
    # No two kept images are as close as the threshold (embedded again here, in other
    # batches than the job's: a margin for the last digits)
    kept = {}
    for tar in sorted((tmp_path / "shards").glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                kept.setdefault(m.name.split(".")[0], {})[m.name.split(".")[1]] = (
                    t.extractfile(m).read())  # fmt: skip
    keys = sorted(kept)
    assert keys == sorted(k for k, s in status.items() if s == "success")
    table = alignment.score(Engine(load(SCORER)), keys, [kept[k]["jpg"] for k in keys],
                            [kept[k]["txt"].decode() for k in keys], 64)  # fmt: skip
    vectors = np.stack(table.column("image_embedding").to_numpy(zero_copy_only=False))
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -1)
    assert similarity.max() < 0.995 + 1e-4
    assert "low_alignment" not in summary["status_counts"]  # no filter asked for


def test_sigkill_while_scoring_then_resume_gives_the_same_shards(
    filtered, noisy, ray_cluster, tmp_path
) -> None:
    ref, _ = filtered
    out = tmp_path / "shards"
    cfg = config(noisy, out, *FILTER)
    args = [f"--input={noisy}/metadata.parquet", f"--output={out}", "output.samples_per_shard=100",
            "image.image_size=64", "compute.rows_per_task=50", "tracking.experiment=test-filter",
            *FILTER]  # fmt: skip
    env = os.environ | {"RAY_ADDRESS": ray_cluster.address, "PYTHONPATH": str(Path.cwd())}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.curate", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    scores = out / "_work" / "scores"
    try:
        sigkill_when(proc, lambda: scores.exists() and any(scores.glob("*.parquet")))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "manifest.json").exists(), "the job finished before it was killed"
    run(cfg)
    for name in sorted(p.name for p in ref.iterdir()):
        assert (out / name).read_bytes() == (ref / name).read_bytes() or name == "manifest.json"
    got, want = (json.loads((d / "manifest.json").read_text()) for d in (out, ref))
    assert got.pop("config").pop("output") != want.pop("config").pop("output")
    assert got == want  # counts, shards, digest, the model's summary


def test_a_bad_model_or_threshold_fails_before_any_work(scorer, noisy, tmp_path, capsys) -> None:
    base = ["--input", f"{noisy}/metadata.parquet", "--output", str(tmp_path / "out")]
    assert main([*base, "alignment.model=models:/no-such-model@x"]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert main([*base, f"alignment.model=models:/{NAME}/2", "alignment.min_score=0.2"]) == 2
    assert "fusion=early) has no image and text embeddings" in capsys.readouterr().err
    assert main([*base, f"alignment.model={SCORER}", "alignment.keep_fraction=1.5"]) == 2
    assert "alignment.keep_fraction=1.5 must be in (0, 1]" in capsys.readouterr().err
    assert main([*base, "dedup.semantic=true"]) == 2
    assert "dedup.semantic compares the image embeddings of alignment.model" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists()
