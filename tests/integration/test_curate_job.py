"""The curation job end to end: real Ray, real HTTP on 127.0.0.1, a real MLflow server.

The session's local Ray cluster runs it. The sample crawl is served over HTTP with broken
endpoints mixed in (404, 500, a slow answer, a drip feed); every invariant of the output
layout is checked, the shards are read back with both readers, and a run killed with SIGKILL
is resumed to the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import collections
import csv
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
import webdataset as wds

from mmcore.config import ConfigError, load_config
from mmcore.data.dedup import DedupConfig, find_duplicates
from mmcore.data.shards import file_sha256
from pipelines.curate import CurateConfig, format_table, main, run
from pipelines.dedup import deduplicate, read_decisions
from tests.helpers import sigkill_when

pytestmark = pytest.mark.integration
BROKEN = {"/status/500": "HTTP 500", "/slow/20": "timed out", "/drip": "timeout"}


@pytest.fixture(scope="module")
def ray_address(ray_cluster) -> str:
    return ray_cluster.address


@pytest.fixture(scope="module")
def metadata(sample_dir: Path, image_server, tmp_path_factory) -> Path:
    """The sample crawl with http:// URLs, plus one row per broken endpoint and a good image
    whose server opts it out (X-Robots-Tag: noimageai)."""
    table = pq.read_table(sample_dir / "metadata.parquet")
    urls = [f"{image_server.url}/images/{f}" for f in table.column("file").to_pylist()]
    rows = table.set_column(0, "url", pa.array(urls)).to_pylist()
    clean = [r for r in rows if r["kind"] == "clean"]
    for i, route in enumerate(BROKEN):  # a good row with its URL broken
        rows.insert(
            i * 40 + 5, clean[i] | {"url": image_server.url + route, "kind": f"broken{route}"}
        )
    opted = f"{image_server.url}/robots/noimageai/{clean[5]['file']}"
    rows.insert(150, clean[5] | {"url": opted, "kind": "opted_out"})
    path = tmp_path_factory.mktemp("meta") / "crawl.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    qa = pq.read_table(sample_dir / "qa.parquet")  # the questions, by the served URLs
    urls = [f"{image_server.url}/images/{Path(u).name}" for u in qa.column("url").to_pylist()]
    pq.write_table(qa.set_column(0, "url", pa.array(urls)), path.parent / "qa.parquet")
    return path


def config(metadata: Path, out: Path, *extra: str) -> CurateConfig:
    # A 3 s timeout: under the full suite's load the image server can take over a second to
    # send a good image, which then failed in one run and not the next; the broken endpoints
    # still time out (20 s, a body that never ends).
    overrides = [
        f"input.path={metadata}", f"input.qa={metadata.parent / 'qa.parquet'}",
        f"output.path={out}", "output.samples_per_shard=64",
        "image.image_size=64", "image.resize_mode=center_crop", "fetch.timeout_s=3.0",
        "fetch.retries=1", "fetch.backoff_s=0.05", "compute.rows_per_task=32",
"tracking.experiment=test-curate", *extra,
    ]  # fmt: skip
    return load_config(CurateConfig, None, overrides)


@pytest.fixture(scope="module")
def first_run(ray_address, metadata, mlflow_server, tmp_path_factory):
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server.url
    out = tmp_path_factory.mktemp("run") / "shards"
    t0 = time.monotonic()
    summary = run(config(metadata, out))
    return out, summary, time.monotonic() - t0


def read_all_parquet(out: Path) -> list[dict]:
    return pa.concat_tables(pq.read_table(p) for p in sorted(out.glob("*.parquet"))).to_pylist()


def test_every_input_row_is_accounted_for(first_run, metadata, sample_dir, image_server) -> None:
    out, summary, elapsed = first_run
    inputs = pq.read_table(metadata).to_pylist()
    rows = read_all_parquet(out)
    assert len(rows) == len(inputs) == summary["n_input"]
    assert sorted(r["url"] for r in rows) == sorted(r["url"] for r in inputs)
    assert len({r["key"] for r in rows}) == len(rows)

    expected = json.loads((sample_dir / "sample_info.json").read_text())["expected_status"]
    for route in BROKEN:
        expected[f"broken{route}"] = "failed_to_download"
    expected["opted_out"] = "opted_out"
    wrong = [(r["kind"], r["status"]) for r in rows if r["status"] != expected[r["kind"]]]
    assert not wrong
    assert image_server.user_agents == {CurateConfig().fetch.user_agent}
    for r in rows:
        assert (r["status"] == "success") == (r["error_message"] == ""), r
        if r["kind"].startswith("broken"):
            assert BROKEN[r["kind"][6:]] in r["error_message"]
        if r["kind"] == "opted_out":
            assert r["error_message"] == "X-Robots-Tag: noimageai"
        if r["status"] in ("duplicate", "near_duplicate"):
            assert r["duplicate_of"] < r["key"]  # the smallest key was kept
    dups = [r for r in rows if r["duplicate_of"]]
    assert any(r["duplicate_of"][:5] != r["key"][:5] for r in dups)  # found across shards
    assert elapsed < 240  # the slow and dripping endpoints did not hang the job


def test_the_jobs_dedup_equals_the_one_process_dedup(first_run) -> None:
    """mmcore's one-process dedup over the hash columns of the output gives the same statuses
    and duplicate_of, row for row, as the job's dedup."""
    out, _, _ = first_run
    seen = [r for r in read_all_parquet(out)
            if r["status"] in ("success", "duplicate", "near_duplicate")]  # fmt: skip
    columns = [[r[c] for r in seen] for c in ("key", "sha256", "phash", "thumb")]
    expected = find_duplicates(*columns, DedupConfig())
    got = {r["key"]: (r["status"], r["duplicate_of"]) for r in seen if r["duplicate_of"]}
    assert got == expected
    assert {s for s, _ in expected.values()} == {"duplicate", "near_duplicate"}


def test_dedup_in_one_task_equals_the_group_bys(ray_address, tmp_path) -> None:
    """A small job's dedup runs in one task, a large one's as Ray Data group-bys: on the same
    staged rows (exact copies, near copies at 0-8 bits, some in other colours, across
    shards) both decide exactly what the one-process dedup decides."""
    rng = np.random.default_rng(0)
    n, keys = 3000, [f"{i // 1000:05d}{i % 1000:04d}" for i in range(3000)]
    sha = [f"{i:064x}" for i in range(n)]
    phash = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64)
    thumbs = [bytes([128] * 48)] * n
    for i in rng.choice(np.arange(1, n), 600, replace=False).tolist():
        j = int(rng.integers(0, i))
        if rng.random() < 0.4:
            sha[i], phash[i] = sha[j], phash[j]
        else:
            bits = rng.choice(64, int(rng.integers(0, 9)), replace=False).tolist()
            phash[i] = phash[j] ^ np.uint64(sum(1 << b for b in bits))
            thumbs[i] = bytes([128 if rng.random() < 0.7 else 200] * 48)
    pieces = tmp_path / "pieces"
    pieces.mkdir()
    for shard in range(3):
        rows = slice(shard * 1000, shard * 1000 + 1000)
        table = pa.table(
            {
                "key": keys[rows],
                "status": ["success"] * 1000,
                "sha256": sha[rows],
                "phash": pa.array(phash[rows], pa.uint64()),
                "thumb": thumbs[rows],
            }
        )
        pq.write_table(table, pieces / f"{shard:05d}_{keys[rows][0]}.parquet")  # fmt: skip
    paths = sorted(str(p) for p in pieces.iterdir())
    expected = find_duplicates(keys, sha, phash.tolist(), thumbs, DedupConfig())
    assert {s for s, _ in expected.values()} == {"duplicate", "near_duplicate"}
    for one_task_rows in (n, 0):
        work = str(tmp_path / f"work-{one_task_rows}")
        folder = deduplicate(DedupConfig(), paths, 9, [], work, n, one_task_rows)
        got = {k: v for shard in range(3) for k, v in read_decisions(folder, shard).items()}
        assert {k: v[:2] for k, v in got.items()} == expected, one_task_rows
        assert {v[2] for v in got.values()} == {None}  # "STATUS of KEY" in the shard


def test_dedup_against_an_earlier_output_keeps_nothing_seen_there(
    first_run, metadata, tmp_path
) -> None:
    """An incremental crawl: the same rows again, deduplicated against the first output
    (read from its shard parquet, not decoded again). Every image kept there is a duplicate
    of it now, named by that output and key; the near copies are near duplicates of it."""
    out, summary, _ = first_run
    # As a large job would (the group-bys; a small one's dedup in one task reads the same)
    again = run(config(metadata, tmp_path / "again", f"dedup.against={out}",
                       "compute.dedup_one_task_rows=0"))  # fmt: skip
    assert again["n_samples"] == 0 and again["n_input"] == summary["n_input"]
    before = {r["key"]: r for r in read_all_parquet(out)}
    for row in read_all_parquet(tmp_path / "again"):
        first = before[row["key"]]
        if first["status"] == "success":
            assert (row["status"], row["duplicate_of"]) == ("duplicate", f"{out}#{row['key']}")
        elif first["status"] in ("duplicate", "near_duplicate"):
            assert row["status"] in ("duplicate", "near_duplicate")
            assert row["duplicate_of"].startswith(f"{out}#")
        else:
            assert row["status"] == first["status"]


def test_rows_not_kept_are_counted_by_host(first_run, image_server) -> None:
    """The summary's top failing hosts and failures_by_host.csv agree with the rows' own
    statuses."""
    out, summary, _ = first_run
    expected = collections.Counter(
        (urlparse(r["url"]).netloc, r["status"])
        for r in read_all_parquet(out)
        if r["status"] != "success"
    )
    with open(out / "failures_by_host.csv") as f:
        table = {(r["host"], r["status"]): int(r["rows"]) for r in csv.DictReader(f)}
    assert table == expected
    (top,) = summary["top_failing_hosts"]  # one host serves the whole crawl here
    assert top["host"] == urlparse(image_server.url).netloc
    assert top["rows"] == sum(expected.values()) and top["by_status"]["opted_out"] == 1
    assert "rows not kept, by host" in format_table(summary)


def test_tars_stats_and_manifest_agree(first_run) -> None:
    out, summary, _ = first_run
    manifest = json.loads((out / "manifest.json").read_text())
    rows = read_all_parquet(out)
    successes = collections.Counter(r["key"][:5] for r in rows if r["status"] == "success")
    assert manifest["n_samples"] == summary["n_samples"] == sum(successes.values())
    assert manifest["status_counts"] == dict(
        sorted(collections.Counter(r["status"] for r in rows).items())
    )
    assert manifest["config"]["image"]["image_size"] == 64
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["tar"]) as tar:
            names = tar.getnames()
        keys = sorted({n.split(".")[0] for n in names})
        assert len(keys) == shard["successes"] == successes[shard["shard"]]
        assert sorted(names) == sorted(f"{k}.{e}" for k in keys for e in ("jpg", "txt", "json"))
        assert file_sha256(out / shard["tar"]) == shard["sha256"]
        stats = json.loads((out / f"{shard['shard']}_stats.json").read_text())
        assert stats["count"] == shard["count"] == len(pq.read_table(out / shard["parquet"]))
    assert not (out / "_work").exists() and not list(out.glob(".*"))


def test_shards_read_with_webdataset_and_ray_data(first_run) -> None:
    out, summary, _ = first_run
    tars = sorted(str(p) for p in out.glob("*.tar"))
    captions = {r["key"]: r["caption"] for r in read_all_parquet(out) if r["status"] == "success"}
    seen = {}
    dataset = (
        wds.WebDataset(tars, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "txt")
    )
    for key, image, text in dataset:
        assert image.size == (64, 64)
        seen[key] = text
    assert seen == captions

    ds = ray.data.read_webdataset(tars)
    assert ds.count() == summary["n_samples"]
    row = ds.take(1)[0]
    assert row["jpg"].shape == (64, 64, 3) and row["json"]["key"] == row["__key__"]


def test_each_samples_json_carries_its_questions(first_run, metadata) -> None:
    """``input.qa`` joins the questions by URL; they reach KEY.json as a list, and the parquet
    (every row, kept or not) as its JSON text."""
    out, _, _ = first_run
    expected = collections.defaultdict(list)
    for row in pq.read_table(metadata.parent / "qa.parquet").to_pylist():
        expected[row["url"]].append({k: row[k] for k in ("question", "answer", "type")})
    rows = {r["key"]: r for r in read_all_parquet(out)}
    assert all(json.loads(r["qa"]) == expected.get(r["url"], []) for r in rows.values())
    asked = 0
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as archive:
            for member in archive:
                if member.name.endswith(".json"):
                    meta = json.loads(archive.extractfile(member).read())
                    assert meta["qa"] == expected.get(rows[meta["key"]]["url"], [])
                    asked += bool(meta["qa"])
    kept = sum(r["status"] == "success" for r in rows.values())
    assert asked == kept  # every kept image has questions: the crawl's questions cover them


def test_mlflow_run_records_config_counts_and_lineage(first_run, mlflow_server) -> None:
    out, summary, _ = first_run
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    run_ = client.get_run(summary["run_id"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert run_.data.metrics["curate/n_samples"] == manifest["n_samples"]
    assert run_.data.metrics["curate/samples_per_s"] > 0
    assert run_.data.metrics["curate/count_duplicate"] == manifest["status_counts"]["duplicate"]
    assert run_.data.params["image.image_size"] == "64"
    artifacts = [a.path for a in client.list_artifacts(run_.info.run_id)]
    assert artifacts == ["failures_by_host.csv", "manifest.json"]
    (dataset_input,) = run_.inputs.dataset_inputs
    assert manifest["digest"].startswith(dataset_input.dataset.digest)


def test_rerun_is_a_no_op_and_a_new_config_is_refused(first_run, metadata) -> None:
    out, summary, _ = first_run
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = run(config(metadata, out))
    assert again["processed"] == 0 and again["digest"] == summary["digest"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    with pytest.raises(ConfigError, match="different config"):
        run(config(metadata, out, "image.image_size=32"))


def test_sigkill_midway_then_resume_gives_the_same_shards(
    first_run, metadata, ray_address, image_server, tmp_path
) -> None:
    out_ref, summary_ref, _ = first_run
    out = tmp_path / "shards"
    cfg = config(metadata, out, "fetch.threads=2")  # slow enough to kill it halfway
    args = [f"{k}={v}" for k, v in _overrides(cfg).items()]
    env = os.environ | {"RAY_ADDRESS": ray_address, "PYTHONPATH": str(Path.cwd())}
    image_server.delay_s = 0.1
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.curate", *args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    plan = out / "_work" / "plan.json"
    try:
        sigkill_when(proc, lambda: _some_shard_staged(plan))
    finally:
        image_server.delay_s = 0.0
        if proc.poll() is None:
            proc.kill()
    assert _some_shard_staged(plan), "no shard was staged before the deadline"
    assert not (out / "manifest.json").exists()
    for tar in out.glob("*.tar"):  # any tar under its final name is whole
        with tarfile.open(tar) as t:
            t.getmembers()

    resumed = run(cfg)
    assert 0 < resumed["processed"] < summary_ref["n_input"]  # staged shards were kept
    ref = json.loads((out_ref / "manifest.json").read_text())
    got = json.loads((out / "manifest.json").read_text())
    assert got["digest"] == ref["digest"] and got["shards"] == ref["shards"]
    # Every input row's record (status, reason, sizes, hashes) too, not only the tars.
    assert read_all_parquet(out) == read_all_parquet(out_ref)
    failures = "failures_by_host.csv"
    assert (out / failures).read_text() == (out_ref / failures).read_text()
    assert not (out / "_work").exists() and not list(out.glob(".*"))


def _overrides(cfg: CurateConfig) -> dict[str, object]:
    from mmcore.config import flatten, to_dict

    return {k: json.dumps(v) for k, v in flatten(to_dict(cfg)).items() if v is not None}


def _some_shard_staged(plan: Path) -> bool:
    if not plan.exists():
        return False
    from mmcore.data.shards import staged_rows

    shard_rows = json.loads(plan.read_text())["shard_rows"]
    staged = staged_rows(plan.parent / "pieces")
    return any(staged.get(s) == n for s, n in enumerate(shard_rows))


def test_bad_input_fails_before_any_work(tmp_path: Path, capsys) -> None:
    meta = tmp_path / "meta.csv"
    meta.write_text("url,text\nhttp://127.0.0.1:9/a.jpg,a red circle\n")
    out = tmp_path / "out"
    assert main(["--input", str(meta), "--output", str(out)]) == 2
    assert "missing column(s) ['caption']" in capsys.readouterr().err
    assert not out.exists()
    assert main(["--input", str(meta), "--output", str(out), "image.size=3"]) == 2
    assert "unknown key(s) in image: image.size" in capsys.readouterr().err
    assert main(["--input", str(meta), "--output", str(out), "--resize-mode", "stretch"]) == 2
    assert "image.resize_mode: 'stretch' is not one of" in capsys.readouterr().err
    against = f"dedup.against={tmp_path}"  # a folder, but no curated output
    assert main(["--input", str(meta), "--caption-col", "text", "--output", str(out), against]) == 2
    assert "is not a finished curated output" in capsys.readouterr().err


def test_shards_feed_the_training_input_pipeline(first_run) -> None:
    """Curated shards → Ray Data read_webdataset → preprocess (map_batches) → torch batches."""
    from mmcore.data.inputs import preprocess
    from mmcore.data.transforms import TransformConfig

    out, summary, _ = first_run
    ds = ray.data.read_webdataset(sorted(str(p) for p in out.glob("*.tar")), decoder=None)
    kwargs = {"image_size": 32, "context_length": 16, "augment": TransformConfig(image_size=32),
              "qa": True}  # fmt: skip
    ds = ds.map_batches(preprocess, fn_kwargs=kwargs, batch_size=32, batch_format="numpy")
    seen = 0
    for batch in ds.iter_torch_batches(batch_size=64):
        assert batch["pixels"].shape[1:] == (3, 32, 32) and batch["pixels"].dtype == torch.float32
        assert batch["input_ids"].shape[1] == 16 and batch["attention_mask"].dtype == torch.int64
        assert batch["qa_ids"].shape[1] == 16 and (batch["qa_mask"].sum(1) > 2).all()
        seen += len(batch["pixels"])
    assert seen == summary["n_samples"]
