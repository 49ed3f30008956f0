"""Input-scale correction: each linear group's input channels rescaled, after quantization, so that the
quantized linears' outputs match the float model's on calibration data (Hubara et al.'s statistics
correction, per input channel, through the model's exact invariances).

Scale-Fold's groups (haloquant/folding.py, the family's knowledge) say where a per-channel factor on a
linear's input can be put without a new tensor: into the norm whose output it is (q/k/v, gate/up:
offset + w ← (offset + w)·s), or into the rows of the linear whose output it is (v → o, per kv head
under grouped-query attention; up → down), whose llama.cpp blocks scale by fp16 fields
(`Codec.scale_fields`, as haloquant/row_scale.py uses). With the quantized weights Ŵ fixed, s is the
least-squares answer of

    min_s  Σ_tokens ‖W x_float − Ŵ diag(s) x_quant‖²,

x_float being the float model's input of the group and x_quant the quantized model's (every earlier
group already corrected): M s = c with M = (ŴᵀŴ) ∘ E[x_q x_qᵀ], c = diag(ŴᵀW E[x_f x_qᵀ]). It
corrects the drift that GPTQ's float-input Hessians do not see and the second moment of each
channel. A group keeps its old values unless the solved s lowers that error.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.func import functional_call

from haloquant.blocks import block_inputs, block_output, module_name
from haloquant.folding import FoldGroup, expand_scales, fold_groups
from haloquant.formats import QuantFormat
from haloquant.modelio import decoder_layers
from haloquant.progress import track
from haloquant.row_scale import rescalable, scaled_bytes
from haloquant.streaming import on_device, place

SCALE_RANGE = (0.5, 2.0)
WIDE = 16384  # inputs wider than this are solved in float32
DAMP = 1e-6  # relative to M's mean diagonal: a channel the calibration never excites stays at 1


@torch.no_grad()
def correct_input_scales(model, ids: torch.Tensor, encoded: dict[str, np.ndarray], formats: dict[str, QuantFormat],
                         device, batch: int = 8, log=None) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor],
                                                                     list[dict]]:
    """(block bytes with rescaled source rows, the float tensors that changed — norm weights, a
    rescaled source's bias — by parameter name, one report entry per group)."""
    device = torch.device(device)
    model = place(model, device)
    x_float, layer_kwargs = block_inputs(model, ids.to(device), batch)
    x_quant = [x.clone() for x in x_float]
    out, changed, report = dict(encoded), {}, []
    groups = fold_groups(model)
    layers = decoder_layers(model)
    for i, layer in track(enumerate(layers), "input-scale correction", "blocks", total=len(layers)):
        with on_device(layer, device):
            prefix = f"{module_name(model, layer)}."
            quant = {n: formats[prefix + n].decode_torch(out[prefix + n], tuple(p.shape), device)
                     for n, p in layer.named_parameters() if prefix + n in out}
            mine = [g for g in groups if g.targets[0].startswith(prefix)]
            order = [n for n, _ in layer.named_modules()]
            for g in sorted(mine, key=lambda g: order.index(g.targets[0][len(prefix):])):
                entry = _correct_group(model, layer, prefix, g, quant, x_float, x_quant, layer_kwargs[i], out,
                                       formats, changed, device)
                report.append(entry)
                if log:
                    log(f"{entry['group']}: output error {entry['error_before']:.4g} → {entry['error_after']:.4g}"
                        + ("" if entry["kept"] else " (kept as it was)"))
            x_float = [block_output(layer(x, **k)) for x, k in zip(x_float, layer_kwargs[i])]
            x_quant = [block_output(functional_call(layer, quant, (x,), k)) for x, k in zip(x_quant, layer_kwargs[i])]
    return out, changed, report


def _correct_group(model, layer, prefix: str, g: FoldGroup, quant: dict, x_float: list, x_quant: list, kw: list,
                   out: dict, formats: dict, changed: dict, device) -> dict:
    rel = lambda name: name[len(prefix):]  # noqa: E731
    entry = {"group": g.name, "kept": False, "error_before": 0.0, "error_after": 0.0}
    src_w = f"{g.source}.weight" if g.source_kind == "rows" else g.source
    if g.source_kind == "rows" and (src_w not in out or not rescalable(formats[src_w])):
        entry["skipped"] = "the source's format has no scale field to fold a factor into"
        return entry
    w_float = torch.cat([layer.get_submodule(rel(t)).weight.to(device, torch.float32) for t in g.targets])
    w_quant = torch.cat([quant[f"{rel(t)}.weight"].float() for t in g.targets])
    # float64 where the d×d products fit easily; float32 for the widest inputs (a 70B model's 28672-wide down)
    dtype = torch.float64 if w_float.shape[1] <= WIDE else torch.float32
    g_qq, g_fq, target = _input_grams(layer, rel(g.targets[0]), quant, x_float, x_quant, kw, w_float, dtype)
    w_float, w_quant = w_float.to(dtype), w_quant.to(dtype)
    m = (w_quant.T @ w_quant).mul_(g_qq)
    del g_qq
    c = (w_quant.T @ w_float).mul_(g_fq.T).sum(1)
    del g_fq, w_float, w_quant
    # one factor per source channel: under GQA a kv head's channel feeds several query heads' columns
    n_src = m.shape[0] // g.expand
    if g.expand > 1:
        index = expand_scales(torch.arange(n_src, device=device, dtype=torch.float64), g, model).long()
        by_source = torch.zeros(n_src, m.shape[1], dtype=m.dtype, device=device).index_add_(0, index, m)
        m = torch.zeros(n_src, n_src, dtype=m.dtype, device=device).index_add_(1, index, by_source)
        c = torch.zeros(n_src, dtype=c.dtype, device=device).index_add_(0, index, c)
        del by_source
    ones = torch.ones(n_src, dtype=m.dtype, device=device)
    m_ones = m @ ones
    # Σ‖W x_f − Ŵ diag(s) x_q‖² = target − 2 cᵀs + sᵀMs
    error = lambda v, mv: float(target - 2 * (c @ v) + v @ mv)  # noqa: E731
    before = error(ones, m_ones)
    # solved for s − 1 with a small ridge: a channel the calibration never excites keeps s = 1
    damp = DAMP * m.diagonal().mean().clamp_min(1e-30)
    m.diagonal().add_(damp)
    delta = torch.linalg.solve(m, c - m_ones)
    m.diagonal().sub_(damp)
    s = torch.where(torch.isfinite(delta), 1 + delta, ones).clamp(*SCALE_RANGE)
    after = error(s, m @ s)
    entry.update(error_before=before, error_after=after, scale_min=float(s.min()), scale_max=float(s.max()))
    if not after < before:
        return entry
    entry["kept"] = True
    if g.source_kind == "norm":
        offset = g.norm_offset
        w = quant.get(rel(g.source), layer.get_parameter(rel(g.source)).to(device))
        new = ((offset + w.double()) * s - offset).float()
        quant[rel(g.source)] = new
        changed[g.source] = new.cpu()
        return entry
    fmt, rows_total = formats[src_w], out[src_w].shape[0]
    alpha = np.ones(rows_total, np.float32)
    alpha[g.rows] = s.float().cpu().numpy()
    out[src_w] = scaled_bytes(fmt, out[src_w], alpha)
    shape = tuple(layer.get_submodule(rel(g.source)).weight.shape)
    quant[rel(src_w)] = fmt.decode_torch(out[src_w], shape, device)
    bias = layer.get_submodule(rel(g.source)).bias
    if bias is not None:
        b = quant.get(rel(f"{g.source}.bias"), bias.to(device)).clone().float()
        b *= torch.from_numpy(alpha).to(device)
        quant[rel(f"{g.source}.bias")] = b
        changed[f"{g.source}.bias"] = b.cpu()
    return entry


def _input_grams(layer, target: str, quant: dict, x_float: list, x_quant: list, kw: list, w_float: torch.Tensor,
                 dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Σ x_q x_qᵀ, Σ x_f x_qᵀ of `target`'s input over all windows (products in float32 per window batch,
    summed in `dtype`), and Σ‖W x_f‖²; each forward stops at `target`."""
    seen = {}

    def capture(mod, inp):
        seen["x"] = inp[0].reshape(-1, inp[0].shape[-1]).float()
        raise _Stop

    handle = layer.get_submodule(target).register_forward_pre_hook(capture)
    g_qq = g_fq = 0
    norm = 0.0
    try:
        for xf, xq, k in zip(x_float, x_quant, kw):
            _until_stop(layer, None, xf, k)
            f = seen["x"]
            _until_stop(layer, quant, xq, k)
            q = seen["x"]
            g_qq = g_qq + (q.T @ q).to(dtype)
            g_fq = g_fq + (f.T @ q).to(dtype)
            norm += float((f @ w_float.T).double().pow(2).sum())
    finally:
        handle.remove()
    return g_qq, g_fq, norm


class _Stop(Exception):
    pass


def _until_stop(layer, params: dict | None, x: torch.Tensor, kw: dict) -> None:
    try:
        if params is None:
            layer(x, **kw)
        else:
            functional_call(layer, params, (x,), kw)
    except _Stop:
        return
    raise RuntimeError("the group's target linear was not reached in the block's forward")
