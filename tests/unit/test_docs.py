"""Every command line that README.md and docs/guides/ show parses, and its config loads (the
command is not run): a documented flag or key that the code lost fails here. Every benchmark
(`python -m bench.NAME`, docs/BENCHMARKS.md) imports."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

from pipelines import api, cli, curate, demo, embed, evaluate, export, index, serve, train, tune

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs" / "guides").glob("*.md"))]


def commands() -> list[tuple[str, list[str]]]:
    """(where, argv after `mmray`) for every mmray, `python -m pipelines.X` and `serve run`
    line in the docs' bash blocks; `python -m pipelines.X` becomes `X`."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = [w.replace("$PWD", str(ROOT)) for w in shlex.split(line, comments=True)]
                where = f"{doc.name}: {line.strip()[:60]}"
                if "-m" in words and words[words.index("-m") + 1].startswith("pipelines."):
                    i = words.index("-m")
                    found.append((where, [words[i + 1].split(".")[1], *words[i + 2 :]]))
                elif words and words[0].endswith("mmray"):
                    found.append((where, words[1:]))
                elif words[:1] == ["serve"] and words[1] in ("run", "deploy"):
                    found.append((where, ["serve", "--config", words[2]]))
    return found


def parse(argv: list[str]) -> object:
    name, rest = argv[0], argv[1:]
    match name:
        case "sample-data":
            return cli.sample_data_args(rest)
        case "curate":
            return curate.parse_args(rest)
        case "train":
            return train.parse_args(rest)
        case "tune":
            return rest[:1] == ["report"] or tune.parse_args(rest)
        case "serve":
            args = serve.parse_args(rest)
            return api.config_from(args.config, args.overrides, args.values)
        case "eval" | "evaluate":
            return evaluate.parse_args(rest)
        case "export":
            return export.parse_args(rest)
        case "embed":
            return embed.parse_args(rest)
        case "index":
            return index.parse_args(rest)
        case "demo":
            return demo.parse_args(rest)
    raise AssertionError(f"unknown command {name}")


def test_the_docs_show_every_stage() -> None:
    shown = {argv[0] for _, argv in commands()}
    assert shown >= {
        "sample-data",
        "curate",
        "train",
        "tune",
        "serve",
        "eval",
        "export",
        "demo",
        "embed",
    }


@pytest.mark.parametrize(("where", "argv"), commands(), ids=lambda v: str(v)[:70])
def test_documented_command_parses(where: str, argv: list[str], monkeypatch) -> None:
    monkeypatch.chdir(ROOT)  # the docs' relative config paths are from the repository root
    try:
        assert parse(argv)
    except SystemExit as e:  # argparse's exit for an unknown or bad flag
        pytest.fail(f"{where}: argparse exited {e.code}")


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "bench").glob("[!_]*.py")))
def test_every_benchmark_imports(name: str) -> None:
    importlib.import_module(f"bench.{name}")  # a name the code moved fails here
