"""Artifacts are functions of their inputs: two clean runs in two folders give the same bytes, and
a stage killed at any moment (kill -9) leaves no partial file under an artifact's name and,
re-run, writes exactly what an uninterrupted run writes."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from haloquant.artifacts import TMP_SUFFIX, sha256_file
from tests.conftest import REPO, small_params, write_params


def artifact_hashes(root: Path) -> dict[str, str]:
    """Every artifact file (not the timing notes, not hidden temporaries) → its hash."""
    out = {}
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root)
        if f.is_file() and rel.parts[0] != ".timing" and not any(p.startswith(".") for p in rel.parts):
            out[str(rel)] = sha256_file(f)
    return out


def hidden_leftovers(root: Path) -> list[str]:
    return [str(f.relative_to(root)) for f in root.rglob(f".*{TMP_SUFFIX}")]


@pytest.mark.slow
def test_two_clean_runs_in_two_folders_give_identical_artifacts(pipeline_run, tmp_path):
    from haloquant.tasks.runner import run_all

    folder, _, _ = pipeline_run
    run_all(write_params(tmp_path / "elsewhere", small_params()))
    first, second = artifact_hashes(folder / "artifacts"), artifact_hashes(tmp_path / "elsewhere" / "artifacts")
    assert "export_gguf/model.gguf" in first and "export_onnx/model.onnx" in first
    assert first == second, {k for k in first if first[k] != second.get(k)}


STAGE_SECONDS = {"calibrate": 6, "sensitivity": 12, "quantize": 6, "export_gguf": 6, "validate": 12}


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGE_SECONDS))
def test_kill_9_anywhere_in_a_stage_then_rerun(stage, pipeline_run, tmp_path):
    """SIGKILL of `haloquant stage <stage>` after a random delay (three seeds; from the process's
    start to past its usual end): every artifact file is then either untouched or absent, never
    partial; the rerun completes, leaves no temporaries, and writes the uninterrupted run's bytes."""
    folder, _, _ = pipeline_run
    reference = artifact_hashes(folder / "artifacts")
    for seed in range(3):
        run = tmp_path / f"seed{seed}"
        shutil.copytree(folder / "artifacts", run / "artifacts")
        params = write_params(run, small_params())
        if seed % 2:  # a stage that runs over its old outputs, and one that writes them anew
            for f in (run / "artifacts" / stage).iterdir():
                f.unlink() if f.is_file() else shutil.rmtree(f)
        delay = random.Random(seed).uniform(0.5, STAGE_SECONDS[stage] + 4)
        proc = subprocess.Popen([sys.executable, "-m", "haloquant.flows.cli", "stage", stage, "--params", str(params)],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        time.sleep(delay)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        after_kill = artifact_hashes(run / "artifacts")
        for name, h in after_kill.items():
            assert h == reference[name], f"seed {seed}, killed after {delay:.1f} s: {name} is partial or different"
        r = subprocess.run([sys.executable, "-m", "haloquant.flows.cli", "stage", stage, "--params", str(params)],
                           cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-1500:]
        assert hidden_leftovers(run / "artifacts" / stage) == []
        assert artifact_hashes(run / "artifacts") == reference, f"seed {seed}: the rerun differs"
