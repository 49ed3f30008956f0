"""sensitivity: for every quantizable weight and candidate format, the calibration-weighted
output error of quantizing that weight alone, E‖(W − Q(W))x‖² = tr(ΔW E[xxᵀ] ΔWᵀ).

Q is the runtime's real codec (decode(encode(W))), and each format's cost is its true storage
in bytes, so the allocate stage optimises exactly what the GGUF will hold.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from haloquant.artifacts import write_json
from haloquant.calibstats import CalibrationStats
from haloquant.formats import get_format
from haloquant.modelio import float_tensors, load_model, quantizable_tensors
from schemas.artifacts import FormatCost, SensitivityTable, TensorSensitivity
from schemas.params import ModelSpec, QuantizeSpec, SensitivitySpec

TABLE_FILE = "sensitivity.json"


def output_error(delta: torch.Tensor, gram: torch.Tensor) -> float:
    """Σ_rows δᵀ G δ: expected squared output error per token (G = E[x xᵀ])."""
    return float(((delta @ gram) * delta).sum())


def lookup_error(delta: torch.Tensor, token_freq: torch.Tensor) -> float:
    """Embedding lookup: expected squared error of the looked-up row, weighted by token frequency."""
    return float((delta.pow(2).sum(1) * token_freq).sum())


@torch.no_grad()
def score_sensitivity(model_spec: ModelSpec, spec: SensitivitySpec, quant_spec: QuantizeSpec, calib_dir: Path,
                      out_dir: Path) -> SensitivityTable:
    """`quant_spec` is the quantizer the costs are measured for (the one quantize will run)."""
    t0 = time.perf_counter()
    stats = CalibrationStats(calib_dir)
    model = load_model(model_spec.path, model_spec.device)
    device = next(model.parameters()).device
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = model.config.tie_word_embeddings
    token_freq = stats.token_freq().to(device)

    formats = [get_format(f) for f in spec.formats]
    rows: list[TensorSensitivity] = []
    for t in quantizable_tensors(model):
        w = params[t.name].detach().float()
        gram = stats.gram(t).to(device)
        importance = stats.importance(t) if quant_spec.importance else None
        cands: dict[str, FormatCost] = {}
        for fmt in formats:
            if not fmt.supports(t.shape):
                continue
            delta = w - torch.from_numpy(fmt.roundtrip(w.cpu().numpy(), importance)).to(device)
            err = output_error(delta, gram)  # as a linear (for embeddings: the output head)
            if t.kind == "token_embd":
                lookup = lookup_error(delta, token_freq)
                err = err + lookup if tied else lookup
            cands[fmt.name] = FormatCost(bytes=fmt.storage_bytes(t.shape), error=err)
        if not cands:
            raise ValueError(f"sensitivity.formats: no listed format fits tensor {t.name} of shape {t.shape}")
        rows.append(TensorSensitivity(name=t.name, gguf_name=t.gguf_name, kind=t.kind, layer=t.layer,
                                      shape=t.shape, n_weights=t.n_weights, candidates=cands))
    fixed = sum(p.numel() * 4 for p in float_tensors(model).values())
    table = SensitivityTable(metric=spec.metric, formats=spec.formats, fixed_bytes=fixed, tensors=rows,
                             seconds=time.perf_counter() - t0)
    write_json(out_dir / TABLE_FILE, table.model_dump())
    return table
