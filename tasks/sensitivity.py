"""sensitivity: for every quantizable weight and candidate format, the calibration-weighted
output error of quantizing that weight alone, E‖(W − Q(W))x‖² = tr(ΔW E[xxᵀ] ΔWᵀ).

Q is the runtime's real codec (decode(encode(W))), and each format's cost is its true storage
in bytes, so the allocate stage optimises exactly what the GGUF will hold.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from haloquant.artifacts import read_json, write_json
from haloquant.formats import get_format
from haloquant.modelio import float_tensors, load_model, quantizable_tensors
from schemas.artifacts import CalibrationReport, FormatCost, SensitivityTable, TensorSensitivity
from schemas.params import ModelSpec, SensitivitySpec

TABLE_FILE = "sensitivity.json"


def output_error(delta: torch.Tensor, gram: torch.Tensor) -> float:
    """Σ_rows δᵀ G δ: expected squared output error per token (G = E[x xᵀ])."""
    return float(((delta @ gram) * delta).sum())


def lookup_error(delta: torch.Tensor, token_freq: torch.Tensor) -> float:
    """Embedding lookup: expected squared error of the looked-up row, weighted by token frequency."""
    return float((delta.pow(2).sum(1) * token_freq).sum())


@torch.no_grad()
def score_sensitivity(model_spec: ModelSpec, spec: SensitivitySpec, calib_dir: Path, out_dir: Path) -> SensitivityTable:
    t0 = time.perf_counter()
    calib = CalibrationReport.model_validate(read_json(calib_dir / "calibration.json"))
    stats = load_file(str(calib_dir / calib.stats_file))
    model = load_model(model_spec.path, model_spec.device)
    device = next(model.parameters()).device
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = model.config.tie_word_embeddings
    token_freq = stats["token_counts"].to(device)
    token_freq = (token_freq / token_freq.sum()).float()

    def gram_of(module: str) -> torch.Tensor:
        return stats[f"{calib.input_of[module]}.gram"].to(device)

    formats = [get_format(f) for f in spec.formats]
    rows: list[TensorSensitivity] = []
    for t in quantizable_tensors(model):
        w = params[t.name].detach().float()
        cands: dict[str, FormatCost] = {}
        for fmt in formats:
            if not fmt.supports(t.shape):
                continue
            delta = w - torch.from_numpy(fmt.roundtrip(w.cpu().numpy())).to(device)
            if t.kind == "token_embd":
                err = lookup_error(delta, token_freq)
                if tied:  # the same matrix is also the output head
                    err += output_error(delta, gram_of("lm_head"))
            elif t.kind == "output":
                err = output_error(delta, gram_of("lm_head"))
            else:
                err = output_error(delta, gram_of(t.module))
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
