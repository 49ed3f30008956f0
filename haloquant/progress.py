"""Progress of a long stage: what is done out of how many, the rate, and the time left.

A stage wraps its main loop in `track(items, "sensitivity", "tensors")`. In a terminal (stderr is
a TTY) that draws a tqdm bar; everywhere else — Prefect's logs, `dvc repro`'s output, CI — it logs
one line on the "haloquant.progress" logger every LOG_EVERY_S seconds ($HALOQUANT_PROGRESS_EVERY_S).
Either way the last line says how many items took how long. The library only logs; the command line prints the
"haloquant" loggers, and the flows hand them to Prefect (PREFECT_LOGGING_EXTRA_LOGGERS).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

log = logging.getLogger("haloquant.progress")

LOG_EVERY_S = 30.0  # without a terminal: a line at most this often (and always the last one)
EVERY_ENV = "HALOQUANT_PROGRESS_EVERY_S"  # overrides LOG_EVERY_S (0: a line per item)
FINAL_LINE_AFTER_S = 1.0  # a loop that took less (and less than the interval) gets no closing line
NO_BAR_ENV = "HALOQUANT_NO_BAR"  # set to 1: log lines even in a terminal

T = TypeVar("T")


def duration(seconds: float) -> str:
    """1h02m, 3m05s, 42s, 0.8s — a time a person reads at a glance."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def size(n_bytes: int) -> str:
    """812 B, 43.1 kB, 13.0 MB, 2.41 GB (powers of 10, as file managers and `file_mb` count)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.3g} {unit}" if n_bytes < 100 * scale else f"{n_bytes / scale:,.0f} {unit}"
    return f"{n_bytes} B"


def singular(unit: str) -> str:
    """batches → batch, tensors → tensor, chunks → chunk."""
    for plural, one in (("ches", "ch"), ("shes", "sh"), ("sses", "ss"), ("s", "")):
        if unit.endswith(plural):
            return unit[: len(unit) - len(plural)] + one
    return unit


def progress_line(what: str, done: int, total: int | None, unit: str, elapsed: float) -> str:
    """`sensitivity: 40/211 tensors (19 %), 0.52 tensors/s, 5m28s left` (the rate and the time left
    only once something is done)."""
    count = f"{done}/{total}" if total else f"{done}"
    line = f"{what}: {count} {unit}"
    if total:
        line += f" ({100 * done / total:.0f} %)"
    if done and elapsed > 0:
        rate = done / elapsed
        line += f", {rate:.3g} {unit}/s" if rate >= 1 else f", {duration(elapsed / done)} per {singular(unit)}"
        if total and done < total:
            line += f", {duration((total - done) / rate)} left"
        elif total and done >= total:
            line += f", done in {duration(elapsed)}"
    return line


def _use_bar() -> bool:
    return sys.stderr.isatty() and os.environ.get(NO_BAR_ENV, "") in ("", "0")


def track(items: Iterable[T], what: str, unit: str, total: int | None = None,
          every_s: float | None = None) -> Iterator[T]:
    """Yield `items`, reporting progress as they are consumed (see the module's doc)."""
    if total is None:
        total = len(items) if hasattr(items, "__len__") else None
    if every_s is None:
        every_s = float(os.environ.get(EVERY_ENV, LOG_EVERY_S))
    t0 = time.perf_counter()
    done = 0
    if _use_bar():
        from tqdm import tqdm

        with tqdm(total=total, desc=what, unit=f" {unit}", leave=False, dynamic_ncols=True) as bar:
            for item in items:
                yield item
                done += 1
                bar.update(1)
    else:
        last = t0
        for item in items:
            yield item
            done += 1
            now = time.perf_counter()
            if now - last >= every_s and (total is None or done < total):
                log.info(progress_line(what, done, total, unit, now - t0))
                last = now
    elapsed = time.perf_counter() - t0
    if elapsed >= min(FINAL_LINE_AFTER_S, every_s):  # a quick loop is said by the stage's summary line
        log.info(progress_line(what, done, total if total is not None else done, unit, elapsed))
