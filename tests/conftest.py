"""Shared fixtures: the shipped reference model, real WikiText texts, small pipeline specs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "data" / "models" / "ref-llama-tiny"
CALIB_TEXT = REPO / "data" / "wikitext-2-raw" / "wiki.valid.raw"
EVAL_TEXT = REPO / "data" / "wikitext-2-raw" / "wiki.test.raw"
SHARED_A = REPO.parent / "shared" / "models" / "ref-llama-a"


def calibrate_tiny(out: Path, n_sequences: int = 8, seq_len: int = 128) -> Path:
    """ref-llama-tiny's calibration statistics from the real WikiText-2 validation text, written to `out`."""
    from haloquant.schemas.params import CalibrationSpec, ModelSpec
    from haloquant.tasks.calibrate import calibrate

    calibrate(ModelSpec(path=TINY, device="cpu", add_bos=True),
              CalibrationSpec(text=CALIB_TEXT, n_sequences=n_sequences, seq_len=seq_len), out)
    return out


def small_params(sweep: dict | None = None, **overrides) -> dict:
    """A fast spec on the real tiny model: few calibration sequences, few evaluation chunks."""
    p = {
        "model": {"path": str(TINY), "device": "cpu", "add_bos": True},
        "calibration": {"text": str(CALIB_TEXT), "n_sequences": 8, "seq_len": 128, "seed": 0},
        "sensitivity": {"formats": ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16"], "metric": "output_error"},
        "allocation": {"budget": {"bits_per_weight": 5.0}},
        "validate": {"text": str(EVAL_TEXT), "ctx": 256, "max_chunks": 4, "batch_size": 4,
                     "gate": {"max_ppl_ratio": 1.5, "max_runtime_ppl_gap": 0.01}},
    }
    if sweep is not None:
        p["sweep"] = sweep
    for dotted, value in overrides.items():
        node = p
        *head, last = dotted.split(".")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = value
    return p


def write_params(folder: Path, data: dict, name: str = "params.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory):
    """The whole pipeline run once on the tiny model; tests read (never modify) its artifacts."""
    from haloquant.tasks.runner import run_all

    folder = tmp_path_factory.mktemp("pipeline")
    params_file = write_params(folder, small_params())
    results = run_all(params_file)
    return folder, params_file, results


def copy_project(dest: Path) -> Path:
    """A copy of the project's tracked files (code, specs, data) for DVC runs in isolation."""
    for item in ("haloquant", "schemas", "tasks", "flows", "data", "policies", "dvc.yaml", "params.yaml",
                 "pyproject.toml", ".dvcignore"):
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, dest / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dest / item)
    return dest
