"""One entry point for turning a weight into block bytes: what quantize writes and what
sensitivity measures are the same quantizer."""

from __future__ import annotations

import logging

import numpy as np
import torch

from haloquant.arrays import fit_device
from haloquant.calibstats import CalibrationStats
from haloquant.formats import QuantFormat
from haloquant.gptq import gptq_quantize
from haloquant.llamacpp import ggml_quantize
from haloquant.modelio import TensorInfo
from haloquant.schemas.params import QuantizeSpec

log = logging.getLogger(__name__)


def uses_gptq(t: TensorInfo, fmt: QuantFormat, spec: QuantizeSpec) -> bool:
    """GPTQ compensates error over a matmul's inputs; an embedding lookup has none, so an untied
    token embedding is rounded to nearest. A tied one is also the output head's matmul."""
    return spec.method == "gptq" and not fmt.is_float and (t.kind != "token_embd" or t.tied)


def gptq_damp(t: TensorInfo, spec: QuantizeSpec) -> float:
    """A tied embedding's Hessian is the head's E[xxᵀ] plus a larger identity share for its lookups
    (measured on ref-llama-a's calibration text: KL of its Q6_K embedding lowest near damp 1)."""
    return spec.gptq.tied_embedding_damp if t.tied else spec.gptq.damp


def encode_tensor(t: TensorInfo, weight: np.ndarray, fmt: QuantFormat, spec: QuantizeSpec,
                  stats: CalibrationStats | None, device: str = "cpu", rounded: np.ndarray | None = None,
                  gram: torch.Tensor | None = None) -> np.ndarray:
    """The tensor's block bytes. `rounded` (rows, cols), if given, receives the weights whose
    nearest grid points the codes are: GPTQ's error-compensated weights (else left as is).
    `gram`: GPTQ's E[xxᵀ] of the input (sequential GPTQ's); default the calibration statistics'."""
    if uses_gptq(t, fmt, spec):
        return gptq_quantize(weight, fmt, stats.gram(t) if gram is None else gram, gptq_damp(t, spec),
                             spec.gptq.act_order, device, rounded)
    importance = stats.importance(t) if spec.importance and stats is not None else None
    if spec.method == "llamacpp" and not fmt.is_float:
        return ggml_quantize(fmt, weight, importance)
    return fmt.encode(weight, importance, device=fit_device(device))


def quantize_tensor(t: TensorInfo, weight: torch.Tensor, fmt: QuantFormat, spec: QuantizeSpec,
                    stats: CalibrationStats, device, rounded: np.ndarray | None = None,
                    gram: torch.Tensor | None = None) -> np.ndarray:
    """The bytes the quantize stage writes for one tensor alone: `encode_tensor`, then (with
    `correct_row_scales`) each output row's block scales refitted (haloquant/row_scale.py). Block
    tuning, which works on whole decoder blocks, is the stage's own."""
    from haloquant.row_scale import correct_row_scales

    data = encode_tensor(t, weight.detach().float().cpu().numpy(), fmt, spec, stats, device, rounded, gram)
    if spec.correct_row_scales and t.kind != "token_embd":  # an embedding's rows are looked up, not outputs
        data, before, after = correct_row_scales(fmt, data, weight.detach().float().cpu(),
                                                 stats.gram(t) if gram is None else gram, device)
        log.debug("quantize: %s row scales: output error %.4g → %.4g", t.name, before, after)
    return data
