"""One entry point for turning a weight into block bytes: what quantize writes and what
sensitivity measures are the same quantizer."""

from __future__ import annotations

import numpy as np

from haloquant.calibstats import CalibrationStats
from haloquant.formats import QuantFormat
from haloquant.gptq import gptq_quantize
from haloquant.llamacpp import ggml_quantize
from haloquant.modelio import TensorInfo
from schemas.params import QuantizeSpec


def uses_gptq(t: TensorInfo, fmt: QuantFormat, spec: QuantizeSpec) -> bool:
    """GPTQ compensates error over a matmul's inputs; an embedding lookup has none, so the token
    embedding (tied or not) is always rounded to nearest."""
    return spec.method == "gptq" and not fmt.is_float and t.kind != "token_embd"


def encode_tensor(t: TensorInfo, weight: np.ndarray, fmt: QuantFormat, spec: QuantizeSpec,
                  stats: CalibrationStats | None, device: str = "cpu") -> np.ndarray:
    if uses_gptq(t, fmt, spec):
        return gptq_quantize(weight, fmt, stats.gram(t), spec.gptq.damp, spec.gptq.act_order, device)
    importance = stats.importance(t) if spec.importance and stats is not None else None
    if spec.method == "llamacpp" and not fmt.is_float:
        return ggml_quantize(fmt, weight, importance)
    return fmt.encode(weight, importance)
