"""Progress and stage lines: what a person watching a long stage sees."""

import logging
import re
import subprocess
import sys

from haloquant import progress
from haloquant.tasks.runner import run_stage
from tests.conftest import REPO, small_params, write_params


def test_progress_lines_count_rate_and_time_left(monkeypatch, caplog):
    clock = iter(float(t) for t in [0, 10, 20, 30, 40, 50])  # one item per 10 s
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(progress, "_use_bar", lambda: False)
    with caplog.at_level(logging.INFO, logger="haloquant.progress"):
        assert list(progress.track(range(4), "sensitivity", "tensors", every_s=15)) == [0, 1, 2, 3]
    lines = [r.getMessage() for r in caplog.records]
    # at 20 s (2 of 4 done: 15 s since the last line), and the closing line at 50 s
    assert lines == ["sensitivity: 2/4 tensors (50 %), 10s per tensor, 20s left",
                     "sensitivity: 4/4 tensors (100 %), 12s per tensor, done in 50s"]


def test_rates_and_sizes_read_as_a_person_writes_them():
    assert progress.progress_line("quantize", 30, 120, "tensors", 10.0) == \
        "quantize: 30/120 tensors (25 %), 3 tensors/s, 30s left"
    assert progress.progress_line("calibrate", 0, 8, "batches", 1.0) == "calibrate: 0/8 batches (0 %)"
    assert progress.progress_line("calibrate", 2, 8, "batches", 96.0) == \
        "calibrate: 2/8 batches (25 %), 48s per batch, 4m48s left"
    assert [progress.singular(u) for u in ("blocks", "chunks", "batches", "tensors", "items")] == \
        ["block", "chunk", "batch", "tensor", "item"]
    assert [progress.duration(s) for s in (0.84, 42, 185, 3725)] == ["0.8s", "42s", "3m05s", "1h02m"]
    assert [progress.size(n) for n in (812, 43_100, 13_409_239, 2_410_000_000)] == \
        ["812 B", "43.1 kB", "13.4 MB", "2.41 GB"]


def test_a_stage_ends_with_one_summary_line_on_stderr(tmp_path):
    """`haloquant stage calibrate` (what dvc repro calls): the stage's line says what it wrote, its
    size and its time; besides it, at most progress lines (a loaded machine can make even this
    stage's one batch, or its pass over the blocks, slow enough to be reported)."""
    params = write_params(tmp_path, small_params())
    for stage in ("plan_widening", "rotate"):  # calibrate reads the rotate stage's record (which model it quantizes)
        run_stage(stage, params)
    r = subprocess.run([sys.executable, "-m", "haloquant.flows.cli", "stage", "calibrate", "--params", str(params)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("calibrate:")]
    assert all(re.match(r"calibrate: \d+/\d+ (batches|blocks) \(", ln) for ln in lines[:-1]), r.stderr
    lines = lines[-1:]
    assert "1,024 tokens (8 × 128) through ref-llama-tiny" in lines[0]
    # the size is what the stage really wrote (its statistics and report), in a person's units
    written = sum(f.stat().st_size for f in (tmp_path / "artifacts" / "calibrate").rglob("*") if f.is_file())
    assert f"({progress.size(written)} written in " in lines[0], (lines[0], written)
