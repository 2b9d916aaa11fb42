"""Progress a person can read: a tqdm bar on a terminal, a plain line every few seconds in a
log (a Ray job's log, a worker's output, a file).

    with Progress("curate", total=4000, unit="rows") as progress:
        progress.update(256, kept=240)          # counts done since the last call; fields

A line reads ``progress: curate 1024/4000 rows (26%) | 85.3 rows/s | ETA 00:35 | kept 960``.
``mmray demo`` follows these lines in each job's log and draws each stage's bar (``Follow``).
"""

from __future__ import annotations

import math
import re
import sys
import time
from typing import IO, Any

from tqdm import tqdm

LINE = re.compile(
    r"progress: (?P<stage>\S+) (?P<n>\d+)/(?P<total>\d+) (?P<unit>\S+) \(\d+%\)(?P<rest>.*)"
)


def ray_data_bars_off() -> Any:
    """Ray Data's own progress bars off (they count blocks and operators; ours count rows or
    steps), without the warning Ray logs about it, and its two lines at the start of every
    execution (training's split coordinator runs one per epoch: on a small crawl, most of a
    job's output); its log file keeps them. Returns the current ``DataContext``."""
    import logging

    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    return context


class Progress:
    """Counts toward ``total``; ``fields`` (name → value) follow the rate and ETA. On a
    terminal a tqdm bar redrawn in place; otherwise ``file`` (stderr) gets a line at most every
    ``every_s`` seconds, and at the end (on a Ray worker too: its output reaches the job's
    log). The rate leaves out start-up (it counts from the first update), unless
    ``from_start``: for units that take seconds each (replicas), whose start-up is theirs, and
    for stages that count whole tasks or trials (curate, embed, tune), whose first update can
    come near the end (a 600-row crawl "ran" at 36 000 rows/s)."""

    def __init__(
        self, stage: str, total: int, unit: str, done: int = 0, every_s: float = 10.0,
        file: IO[str] | None = None, from_start: bool = False,
        per_unit: tuple[str, float] | None = None,
    ) -> None:  # fmt: skip
        self.stage, self.total, self.unit, self.every_s = stage, total, unit, every_s
        # ("samples", 64): each unit is 64 samples; the line shows samples/s at the same rate
        self.per_unit = per_unit
        self.n = done
        self.fields: dict[str, Any] = {}
        # (count, fields) of the last line written; the first line comes after every_s too
        self.last, self.logged = time.monotonic(), None
        self.from_start = from_start
        self.first = (time.monotonic(), done) if from_start else None  # (time, count)
        self.file = file or sys.stderr
        self.bar = None
        if self.file.isatty():
            self.bar = tqdm(total=total, initial=done, unit=f" {unit}", desc=stage, file=self.file,
                            dynamic_ncols=True)  # fmt: skip

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 0, **fields: Any) -> None:
        self.n += n
        self.fields.update(fields)
        if self.first is None and n:
            self.first = (time.monotonic(), self.n)
        if self.bar is not None:
            self.bar.set_postfix_str(self._fields(), refresh=False)
            self.bar.update(n)
        elif time.monotonic() - self.last >= self.every_s:
            self.emit()

    def emit(self) -> None:
        """Write the line now (a bar shows it already)."""
        if self.bar is None:  # not print(): Ray Train's print patch doubled every line
            self.file.write(self.line() + "\n")
            self.file.flush()
            self.last, self.logged = time.monotonic(), (self.n, dict(self.fields))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.logged != (self.n, self.fields):  # the last count and fields, once
            self.emit()

    def line(self) -> str:
        """The rate (and ETA) since the first update (or the start). Below one a second, as
        seconds each: "12.5 s/replica", not "0.08 replicas/s"."""
        rate, left = self.rate(), self.total - self.n
        # Counted from the start, the first few units carry all of the start-up: a crawl's
        # first 64 rows after 16 s said "ETA 34:29" for a 40 s stage. No ETA before 5 %.
        early = self.from_start and self.n < 0.05 * self.total
        if left <= 0:
            eta = "00:00"
        elif rate == 0 or early:
            eta = "?"
        else:
            eta = tqdm.format_interval(left / rate)
        percent = 100 * self.n // max(self.total, 1)
        head = f"progress: {self.stage} {self.n}/{self.total} {self.unit} ({percent}%)"
        if rate == 0:  # nothing counted since the first update: no rate yet
            speed = ""
        elif rate < 1:
            speed = f"{1 / rate:.3g} s/{self.unit.removesuffix('s')}"
        else:
            speed = f"{rate:.3g} {self.unit}/s"
        return " | ".join(x for x in (head, speed, f"ETA {eta}",
                                      self._fields()) if x)  # fmt: skip

    def rate(self) -> float:
        """Units a second since the first update (or the start)."""
        since, done = self.first or (time.monotonic(), self.n)
        return (self.n - done) / max(time.monotonic() - since, 1e-9)

    def _fields(self) -> str:
        fields = self.fields
        if self.per_unit and (rate := self.rate()):
            name, size = self.per_unit
            fields = {f"{name}/s": rate * size} | fields
        return " | ".join(f"{k} {_short(v)}" for k, v in fields.items())


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def parse(line: str) -> dict[str, Any] | None:
    """A progress line (anywhere in ``line``) → stage, n, total, unit, the rest and the line
    from ``progress:`` on; else None."""
    m = LINE.search(line)
    if m is None:
        return None
    return {"stage": m["stage"], "n": int(m["n"]), "total": int(m["total"]), "unit": m["unit"],
            "rest": m["rest"].strip(" |"), "line": m[0]}  # fmt: skip


class Follow:
    """Shows the progress lines of ``stages`` found in a growing log (a Ray job's, fetched
    again and again): a tqdm bar per stage on a terminal, else each stage's latest line at
    most every ``every_s`` seconds (and the last one at ``close``), indented by ``indent``."""

    def __init__(
        self, stages: tuple[str, ...], file: IO[str] | None = None, every_s: float = 10.0,
        indent: str = "    ",
    ) -> None:  # fmt: skip
        self.stages, self.every_s, self.indent = stages, every_s, indent
        self.file = file or sys.stdout
        self.seen = 0  # characters of the log already read
        self.bars: dict[str, tqdm] = {}
        self.last: dict[str, float] = {}  # when a stage's line was last printed
        self.pending: dict[str, str] = {}  # a stage's latest line, not printed yet

    def update(self, log: str) -> None:
        """Read what ``log`` (the whole log so far) adds: whole lines only."""
        end = log.rfind("\n") + 1
        latest = {}
        for line in log[self.seen : end].splitlines():
            if (found := parse(line)) and found["stage"] in self.stages:
                latest[found["stage"]] = found
        self.seen = max(self.seen, end)
        for stage, found in latest.items():
            self._show(stage, found)

    def _show(self, stage: str, found: dict[str, Any]) -> None:
        if not self.file.isatty():
            self.pending[stage] = found["line"]
            if time.monotonic() - self.last.get(stage, -math.inf) >= self.every_s:
                self._print(stage)
            return
        bar = self.bars.get(stage)
        if bar is None or found["n"] < bar.n or found["total"] != bar.total:  # a new run
            if bar is not None:
                bar.close()
            bar = self.bars[stage] = tqdm(total=found["total"], unit=f" {found['unit']}",
                                          desc=self.indent + stage, file=self.file,
                                          dynamic_ncols=True)  # fmt: skip
        bar.set_postfix_str(found["rest"], refresh=False)
        bar.update(found["n"] - bar.n)

    def _print(self, stage: str) -> None:
        self.last[stage] = time.monotonic()
        print(self.indent + self.pending.pop(stage), file=self.file, flush=True)

    def close(self) -> None:
        """Close the bars; without them, print each stage's last line not printed yet."""
        for bar in self.bars.values():
            bar.close()
        for stage in list(self.pending):
            self._print(stage)
