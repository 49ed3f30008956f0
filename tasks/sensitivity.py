"""sensitivity: for every quantizable weight and candidate format, the cost of storing that weight
in that format.

Metrics:
- `output_error`: the calibration-weighted output error of quantizing that weight alone,
  E‖(W − Q(W))x‖² = tr(ΔW E[xxᵀ] ΔWᵀ). Cheap, but in each layer's own output units: a small error
  in v_proj can cost more downstream than a large one in gate_proj.
- `kl_calibrated`: the same error curve per tensor, put in common units by one end-to-end
  measurement per tensor — the KL divergence of the model's output from the float model's when
  only that tensor is quantized (to the candidate nearest 4 bits), on calibration sequences:
  cost(t, f) = KL_t(f_ref) · err_t(f) / err_t(f_ref). One forward pass per tensor.

Q is the runtime's real codec (decode(encode(W))) with the quantizer's importance weights, and
each format's cost is its true storage in bytes, so allocate optimises what the GGUF will hold.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from haloquant.artifacts import write_json
from haloquant.calibstats import CalibrationStats
from haloquant.formats import get_format
from haloquant.modelio import float_tensors, load_model, quantizable_tensors
from haloquant.quantizer import encode_tensor
from schemas.artifacts import FormatCost, SensitivityTable, TensorSensitivity
from schemas.params import ModelSpec, QuantizeSpec, SensitivitySpec

TABLE_FILE = "sensitivity.json"
REFERENCE_BITS = 4.0  # kl_calibrated measures each tensor at the candidate nearest this


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
        cands: dict[str, FormatCost] = {}
        for fmt in formats:
            if not fmt.supports(t.shape):
                continue
            data = encode_tensor(t, w.cpu().numpy(), fmt, quant_spec, stats, device)
            delta = w - torch.from_numpy(fmt.decode(data, t.shape)).to(device)
            err = output_error(delta, gram)  # as a linear (for embeddings: the output head)
            if t.kind == "token_embd":
                lookup = lookup_error(delta, token_freq)
                err = err + lookup if tied else lookup
            cands[fmt.name] = FormatCost(bytes=fmt.storage_bytes(t.shape), error=err)
        if not cands:
            raise ValueError(f"sensitivity.formats: no listed format fits tensor {t.name} of shape {t.shape}")
        rows.append(TensorSensitivity(name=t.name, gguf_name=t.gguf_name, kind=t.kind, layer=t.layer,
                                      shape=t.shape, n_weights=t.n_weights, candidates=cands))
    if spec.metric == "kl_calibrated":
        _calibrate_by_kl(model, rows, stats, spec, quant_spec)
    fixed = sum(p.numel() * 4 for p in float_tensors(model).values())
    table = SensitivityTable(metric=spec.metric, formats=spec.formats, fixed_bytes=fixed, tensors=rows,
                             seconds=time.perf_counter() - t0)
    write_json(out_dir / TABLE_FILE, table.model_dump())
    return table


@torch.no_grad()
def _calibrate_by_kl(model, rows: list[TensorSensitivity], stats: CalibrationStats, spec: SensitivitySpec,
                     quant_spec: QuantizeSpec) -> None:
    """Rescale each tensor's error curve by a measured end-to-end KL (in place)."""
    import torch.nn.functional as F

    from haloquant.modelio import load_tokenizer
    from haloquant.textdata import calibration_batch, read_text, tokenize

    cal = stats.report
    device = next(model.parameters()).device
    tok = load_tokenizer(cal.model_path)
    ids = tokenize(tok, read_text(cal.text, "calibration.text"))
    batch = calibration_batch(ids, min(spec.kl_sequences, cal.n_sequences), cal.seq_len, cal.seed,
                              tok.bos_token_id).to(device)
    ref_logp = F.log_softmax(model(batch).logits.float(), -1)
    params = dict(model.named_parameters(remove_duplicate=False))
    infos = {t.name: t for t in quantizable_tensors(model)}
    for row in rows:
        ref_fmt = min(row.candidates, key=lambda f: abs(get_format(f).bits_per_weight - REFERENCE_BITS))
        ref_err = row.candidates[ref_fmt].error
        p = params[row.name]
        saved = p.detach().clone()
        fmt = get_format(ref_fmt)
        q = fmt.decode(encode_tensor(infos[row.name], saved.float().cpu().numpy(), fmt, quant_spec, stats, device),
                       infos[row.name].shape)
        p.copy_(torch.from_numpy(q).to(p.device, p.dtype))
        logp = F.log_softmax(model(batch).logits.float(), -1)
        p.copy_(saved)
        kl = float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())
        scale = kl / ref_err if ref_err > 0 else 0.0
        for fmt, cost in row.candidates.items():
            row.candidates[fmt] = FormatCost(bytes=cost.bytes, error=cost.error * scale)
