"""A sweep's ablation table and plots, from its finished trials (no Ray: unit-tested as is).

trials = [Trial(id, config, metrics, history, errored), ...]   # from Tune's results
rows = ablation_rows(trials, metric, mode, samples_per_trial, batch, models)
markdown(rows), to_csv(rows), plots(trials, rows, metric, folder)
"""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path
from typing import Any, Literal

import pandas as pd


@dataclasses.dataclass
class Trial:
    """What a sweep keeps of one Tune trial."""

    id: str
    config: dict[str, Any]  # its Tune config: cell, seed, sample
    metrics: dict[str, Any]  # its last report
    history: pd.DataFrame | None = None  # every report
    errored: bool = False


def ablation_rows(
    trials: list[Trial], metric: str, mode: Literal["max", "min"], samples_per_trial: int,
    global_batch: int, models: dict[str, str],
) -> list[dict[str, Any]]:  # fmt: skip
    """One row per trial, best first (unscored last): its cell, the metric, the compute it
    used, and the model it logged (``models``: trial id → URI; none if stopped early).
    ``global_batch`` is the trials' batch unless the space samples ``schedule.global_batch``."""
    rows = []
    for trial in trials:
        sample = trial.config.get("sample", {})
        batch = sample.get("schedule.global_batch", global_batch)
        steps = int(trial.metrics.get("step", 0))
        rows.append({
            "trial": trial.id,
            "fusion": trial.config["cell"]["model.fusion"],
            "loss": "+".join(trial.config["cell"]["loss.terms"]),
            "seed": trial.config["seed"],
            **sample,
            metric: trial.metrics.get(metric),
            "steps": steps,
            "samples_seen": steps * batch,
            "status": "finished" if trial.id in models else "stopped early",
            "steps_saved": samples_per_trial // batch - steps,
            "model_uri": models.get(trial.id, ""),
        })  # fmt: skip
    sign = -1 if mode == "max" else 1
    scored = sorted(
        (r for r in rows if r[metric] is not None), key=lambda r: (sign * r[metric], r["trial"])
    )  # ties by trial id: a restored sweep (its trials in another order) ranks them the same
    return scored + [r for r in rows if r[metric] is None]


def markdown(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def plots(trials: list[Trial], rows: list[dict[str, Any]], metric: str, folder: Path) -> list[Path]:
    """The best trial per fusion × loss cell (bars) and the top 3 trials' learning curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fusions = sorted({r["fusion"] for r in rows})
    losses = sorted({r["loss"] for r in rows})
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(losses)
    for i, loss in enumerate(losses):
        values = []
        for fusion in fusions:
            cell = [r[metric] for r in rows if (r["fusion"], r["loss"]) == (fusion, loss)]
            values.append(max((v for v in cell if v is not None), default=0.0))
        ax.bar([x + i * width for x in range(len(fusions))], values, width, label=loss)
    ax.set_xticks([x + width * (len(losses) - 1) / 2 for x in range(len(fusions))], fusions)
    by_metric = _finish(fig, ax, metric, "best trial per fusion × loss",
                        folder / "metric_by_fusion_loss.png")  # fmt: skip

    fig, ax = plt.subplots(figsize=(6, 4))
    top = {r["trial"] for r in rows[:3]}
    for trial in trials:
        frame = trial.history
        if trial.id in top and frame is not None and metric in frame:
            points = frame[["step", metric]].dropna()
            ax.plot(points["step"], points[metric], marker="o", label=trial.id)
    ax.set_xlabel("step")
    curves = _finish(fig, ax, metric, "learning curves, top trials",
                     folder / "learning_curves_top.png")  # fmt: skip
    return [by_metric, curves]


def _finish(fig: Any, ax: Any, ylabel: str, title: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
