"""Pydantic models of every spec (params.yaml) and every artifact a stage writes."""

from haloquant.schemas.artifacts import (  # noqa: F401
    AllocationResult,
    CalibrationReport,
    ExportReport,
    FoldResult,
    QuantizedManifest,
    SensitivityTable,
    ValidationReport,
)
from haloquant.schemas.params import Params, load_params  # noqa: F401
