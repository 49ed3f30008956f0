"""pareto: every sweep point (tasks/sweep.py) in one size-vs-perplexity DVC plot."""

from __future__ import annotations

from pathlib import Path

from haloquant.artifacts import read_artifact, write_json
from haloquant.schemas.artifacts import SweepPoint
from haloquant.schemas.params import Params
from haloquant.tasks import BUDGET_POINT_DIR, PRESET_POINT_DIR, item_label

POINT_FILE = "point.json"  # what every sweep point writes beside its GGUF
PLOT_FILE = "pareto.json"


def pareto(p: Params, root: Path, out: Path) -> list[SweepPoint]:
    """`root`: the artifacts root the points were written under."""
    dirs = [root / BUDGET_POINT_DIR.format(item_label(b)) for b in p.sweep.bits_per_weight] + \
           [root / PRESET_POINT_DIR.format(x) for x in p.sweep.presets]
    points = [read_artifact(d / POINT_FILE, SweepPoint) for d in dirs]
    points.sort(key=lambda q: (q.series, q.gguf_bytes))
    write_json(out / PLOT_FILE, [q.model_dump() for q in points])
    return points
