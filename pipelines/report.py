"""The demo's report: one HTML page that holds everything inline (charts and thumbnails as
``data:`` URLs), so it opens from disk or as an MLflow artifact with no server.

    html = render(Report(status_counts=..., curves=..., ablation=[png, ...], classify=[...],
                         search_query="a circle", search_hits=[...], table=[("k", "v")]))

Sections: the summary table, curation counts by status (bars), the training curves, the
sweep's ablation plots, and the served model's answers (held-out images with the shape it
gave; a search's top hits with their thumbnails).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
from typing import Any

CSS = """
body{font:15px/1.4 system-ui,sans-serif;margin:2em auto;max-width:1000px;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td{padding:2px 12px 2px 0}td:first-child{color:#555}
.grid{display:flex;flex-wrap:wrap;gap:12px}.card{width:140px;text-align:center;font-size:13px}
.card img{width:128px;height:128px;object-fit:contain;image-rendering:pixelated;
border:1px solid #ccc}.right{color:#070}.wrong{color:#b00}img.chart{max-width:100%}
"""


@dataclasses.dataclass(kw_only=True)
class Report:
    table: list[tuple[str, str]]  # the summary the demo prints
    status_counts: dict[str, int]  # curation: rows by status
    curves: dict[str, list[tuple[int, float]]]  # training metric → (step, value) points
    ablation: list[bytes]  # the sweep's plots (PNG)
    classify: list[dict[str, str]]  # {"image": data URL, "truth": label, "answer": label}
    search_query: str
    search_hits: list[dict[str, Any]]  # {"thumbnail": data URL, "caption": str, "score": float}


def render(r: Report) -> str:
    e = html.escape
    rows = "".join(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in r.table)
    answers = "".join(
        f'<div class="card"><img src="{a["image"]}" alt="{e(a["truth"])}"><br>{e(a["truth"])} '
        f'→ <b class="{"right" if a["answer"] == a["truth"] else "wrong"}">{e(a["answer"])}</b>'
        "</div>"
        for a in r.classify
    )
    hits = "".join(
        f'<div class="card"><img src="{h["thumbnail"]}" alt="hit"><br>{e(h["caption"])}'
        f"<br>{h['score']:.3f}</div>"
        for h in r.search_hits
    )
    charts = [_status_chart(r.status_counts), _curves_chart(r.curves), *r.ablation]
    images = "".join(f'<img class="chart" src="{data_url(png)}">' for png in charts[2:])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>mmray demo report</title><style>{CSS}</style></head>
<body><h1>mmray demo report</h1>
<section id="summary"><table>{rows}</table></section>
<section id="curation"><h2>Curation: rows by status</h2>
<img class="chart" src="{data_url(charts[0])}" alt="rows by status"></section>
<section id="training"><h2>Training</h2>
<img class="chart" src="{data_url(charts[1])}" alt="training curves"></section>
<section id="ablation"><h2>Sweep</h2>{images}</section>
<section id="classify"><h2>Classify: held-out images among the shape names</h2>
<div class="grid">{answers}</div></section>
<section id="search"><h2>Search: {e(r.search_query)!r}</h2><div class="grid">{hits}</div>
</section></body></html>
"""


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _status_chart(counts: dict[str, int]) -> bytes:
    fig, ax = _figure()
    names = sorted(counts, key=lambda k: -counts[k])
    bars = ax.barh(names[::-1], [counts[n] for n in names[::-1]],
                   color=["#2a7" if n == "success" else "#c66" for n in names[::-1]])  # fmt: skip
    ax.bar_label(bars, padding=3)
    ax.set_xlabel("rows")
    return _png(fig)


def _curves_chart(curves: dict[str, list[tuple[int, float]]]) -> bytes:
    fig, ax = _figure()
    loss = curves.get("train/loss", [])
    ax.plot([s for s, _ in loss], [v for _, v in loss], color="#888", label="train/loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    evals = ax.twinx()
    for name, points in curves.items():
        if name != "train/loss":
            evals.plot([s for s, _ in points], [v for _, v in points], marker="o", label=name)
    evals.set_ylim(0, 1.02)
    evals.set_ylabel("held-out evaluation")
    fig.legend(loc="upper center", ncol=3, fontsize=8)
    return _png(fig)


def _figure() -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 3.6))


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
