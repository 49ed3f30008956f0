"""scale_fold: per-channel scales that migrate activation outliers from a norm into the linears
after it (W·diag(s), norm / s). The float function is unchanged; only quantization error moves.

The stage is in the DAG so its artifact (the scales) is cached and versioned like the others.
Method `identity` folds nothing: quantize then uses the model's weights as they are.
"""

from __future__ import annotations

from pathlib import Path

from haloquant.artifacts import write_json
from schemas.artifacts import FoldResult
from schemas.params import FoldSpec, ModelSpec

FOLD_FILE = "fold.json"


def scale_fold(model_spec: ModelSpec, spec: FoldSpec, calib_dir: Path, allocation_dir: Path,
               out_dir: Path) -> FoldResult:
    if spec.method == "identity":
        result = FoldResult(method="identity", scales_file=None, groups=[])
    else:  # the schema admits no other method yet
        raise AssertionError(spec.method)
    write_json(out_dir / FOLD_FILE, result.model_dump())
    return result
