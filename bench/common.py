"""What every bench script needs first: the model spec, the evaluation text, one calibration."""

from __future__ import annotations

from pathlib import Path

from haloquant.textdata import read_text
from schemas.params import CalibrationSpec, ModelSpec
from tasks.calibrate import calibrate

REPO = Path(__file__).resolve().parent.parent
EVAL_TEXT = REPO / "data/wikitext-2-raw/wiki.test.raw"
CALIB_TEXT = REPO / "data/wikitext-2-raw/wiki.valid.raw"


def setup(model: Path, out: Path) -> tuple[ModelSpec, Path, str]:
    """(model spec, calibration dir, evaluation text); calibrates into out/calibrate once
    (64 × 256 tokens of WikiText-2 validation, as the default params.yaml)."""
    spec = ModelSpec(path=model.resolve(), device="cpu")
    calib = out / "calibrate"
    if not (calib / "calibration.json").is_file():
        calibrate(spec, CalibrationSpec(text=CALIB_TEXT, n_sequences=64, seq_len=256), calib)
    return spec, calib, read_text(EVAL_TEXT, "eval")
