"""Scale-Fold: migrate activation outliers into the weights, exactly.

For a group "source → linears" and per-channel scales s > 0 (over the linears' input channels):
- norm → linears (input_layernorm → q,k,v; the MLP's input norm → gate,up):
  W ← W·diag(s), norm weight ← norm weight / s (a (1 + w) norm, Gemma's: 1 + w ← (1 + w) / s).
- v_proj → o_proj: o_proj columns · s, v_proj rows / s (the v rows of a fused qkv_proj). Attention mixes tokens, not channels, so
  this is exact; under grouped-query attention the o_proj columns of every query head that shares a
  kv head get that kv head's scales.
- up_proj → down_proj: down_proj columns · s, up_proj rows / s (the gate multiplies elementwise;
  the up rows of a fused gate_up_proj).
Which norm feeds which linears is the model family's knowledge (haloquant/families).
In float arithmetic the model computes the same function; only where quantization error falls moves.

s_j = max|x_j|^α / max_i|W_ij|^(1−α) (SmoothQuant / AWQ form), α chosen per group from a grid to
minimise the quantized output error E‖(W − Q(W·diag(s))·diag(1/s)) x‖² at the formats the
allocation chose, with x's calibration statistics (max |x| and E[xxᵀ]).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from haloquant.families import family
from haloquant.formats import get_format
from haloquant.modelio import head_dim

@dataclass
class FoldGroup:
    name: str  # e.g. layers.3.attn_in
    source: str  # parameter divided by s (a norm weight) or a linear whose rows are divided by s
    source_kind: str  # "norm" | "rows"
    targets: list[str]  # linear modules whose columns are multiplied by s
    stats_module: str  # module whose input statistics describe x
    expand: int = 1  # GQA: each source channel feeds `expand` target channel blocks (v → o)
    rows: slice = field(default_factory=lambda: slice(None))  # "rows": the source's rows that feed the targets (a fused linear's part)
    norm_offset: float = 0.0  # "norm": the norm multiplies by (norm_offset + weight)


def fold_groups(model) -> list[FoldGroup]:
    """The exact folds of the model's family (haloquant/families), layer by layer."""
    cfg = model.config
    fam = family(model)
    n_rep = cfg.num_attention_heads // (cfg.num_key_value_heads or cfg.num_attention_heads)
    groups = []
    for i in range(cfg.num_hidden_layers):
        p = fam.layer(i)
        groups += [FoldGroup(f"layers.{i}.{f.label}", f"{p}.{f.norm}.weight", "norm", [f"{p}.{t}" for t in f.linears],
                             f"{p}.{f.linears[0]}", norm_offset=fam.norm_offset) for f in fam.norm_feeds]
        groups += [FoldGroup(f"layers.{i}.{f.label}", f"{p}.{f.source}", "rows", [f"{p}.{f.target}"], f"{p}.{f.target}",
                             expand=n_rep if f.per_kv_head else 1, rows=f.rows(cfg)) for f in fam.rows_feeds]
    return groups


def expand_scales(s: torch.Tensor, group: FoldGroup, model) -> torch.Tensor:
    """Source-channel scales → target input-channel scales (GQA: repeat per query head)."""
    if group.expand == 1:
        return s
    hd = head_dim(model.config)
    return s.view(-1, 1, hd).expand(-1, group.expand, hd).reshape(-1)


@torch.no_grad()
def apply_fold(model, group: FoldGroup, s_source: torch.Tensor) -> None:
    """Fold scales into the model in place (exact in real arithmetic). Weights a streamed model
    stores in bf16/fp16 are widened to float32 first: a folded weight is no longer on their grid."""
    params = dict(model.named_parameters())
    mods = dict(model.named_modules())
    touched = [f"{t}.weight" for t in group.targets] + (
        [group.source] if group.source_kind == "norm" else [f"{group.source}.weight", f"{group.source}.bias"])
    for name in touched:
        if name in params and params[name].dtype != torch.float32:
            params[name].data = params[name].data.float()
    s_src = s_source.to(params[group.source if group.source_kind == "norm" else f"{group.source}.weight"].dtype)
    s_tgt = expand_scales(s_src, group, model)
    for t in group.targets:
        mods[t].weight.mul_(s_tgt[None, :])
    if group.source_kind == "norm":  # offset + w ← (offset + w) / s
        w = params[group.source]
        w.copy_((group.norm_offset + w) / s_src - group.norm_offset)
    else:
        src = mods[group.source]
        src.weight[group.rows].div_(s_src[:, None])
        if src.bias is not None:
            src.bias[group.rows].div_(s_src)


def source_scales(group: FoldGroup, model, x_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s over the source channels: max|x|^α / max|W|^(1−α), with W the targets' columns."""
    mods = dict(model.named_modules())
    w_max = torch.stack([mods[t].weight.detach().abs().amax(0) for t in group.targets]).amax(0).float()
    xm, wm = x_max.float().clamp_min(1e-5), w_max.clamp_min(1e-5)
    if group.expand > 1:  # one scale per kv-head channel: take the worst query head sharing it
        hd = head_dim(model.config)
        xm = xm.view(-1, group.expand, hd).amax(1).reshape(-1)
        wm = wm.view(-1, group.expand, hd).amax(1).reshape(-1)
    s = xm.pow(alpha) / wm.pow(1 - alpha)
    return (s / s.pow(0.5).mean().pow(2)).clamp(1e-4, 1e4)  # normalised: scale-free under α


def quantized_error(model, group: FoldGroup, s_source: torch.Tensor, formats: dict[str, str],
                    gram: torch.Tensor) -> float:
    """E‖(W − Q(W·diag(s))·diag(1/s)) x‖² summed over the group's targets (x: original inputs)."""
    mods = dict(model.named_modules())
    s = expand_scales(s_source, group, model).double()
    total = 0.0
    for t in group.targets:
        w = mods[t].weight.detach().double()
        fmt = get_format(formats[t])
        scaled = (w * s[None, :]).float().numpy()
        q = torch.from_numpy(fmt.roundtrip(scaled, (torch.diagonal(gram).double() / s.pow(2)).float().numpy()))
        delta = w - q.double() / s[None, :]
        total += float(((delta @ gram.double()) * delta).sum())
    return total


def search_alpha(model, group: FoldGroup, x_max: torch.Tensor, gram: torch.Tensor, formats: dict[str, str],
                 grid: list[float]) -> tuple[float, float, float, torch.Tensor]:
    """The α of `grid` (0 = no fold) with the lowest quantized output error; returns
    (alpha, error, error without folding, scales)."""
    ones = torch.ones_like(source_scales(group, model, x_max, 0.0))
    base = quantized_error(model, group, ones, formats, gram)
    best = (0.0, base, ones)
    for a in grid:
        if a == 0:
            continue
        s = source_scales(group, model, x_max, a)
        err = quantized_error(model, group, s, formats, gram)
        if err < best[1]:
            best = (a, err, s)
    return best[0], best[1], base, best[2]


def outlier_stats(x_max: torch.Tensor, x_mean: torch.Tensor) -> dict:
    """Per-group activation outlier statistics: max/mean ratio of channel maxima, kurtosis of maxima."""
    m = x_max.double()
    z = (m - m.mean()) / m.std().clamp_min(1e-12)
    return {"max_over_mean": float(m.max() / x_mean.double().mean().clamp_min(1e-12)),
            "channel_max_ratio": float(m.max() / m.median().clamp_min(1e-12)),
            "kurtosis": float((z**4).mean())}


def weight_outliers(w: torch.Tensor) -> dict:
    col = w.detach().double().abs().amax(0)
    z = (w.detach().double().flatten() - w.double().mean()) / w.double().std()
    return {"col_max_ratio": float(col.max() / col.median().clamp_min(1e-12)), "kurtosis": float((z**4).mean())}


def as_numpy(d: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().float().numpy() for k, v in d.items()}


def load_folds(model, fold_dir) -> dict[str, torch.Tensor]:
    """Apply a scale_fold artifact to `model` in place; returns, per folded linear module, the
    scales its input was divided by (to rescale calibration statistics of that input)."""
    from pathlib import Path

    from safetensors.torch import load_file

    from haloquant.artifacts import read_json

    fold = read_json(Path(fold_dir) / "fold.json")
    scales = load_file(str(Path(fold_dir) / fold["scales_file"])) if fold.get("scales_file") else {}
    by_name = {g.name: g for g in fold_groups(model)}
    input_scales: dict[str, torch.Tensor] = {}
    for name, s in scales.items():
        g = by_name[name]
        apply_fold(model, g, s)
        for t in g.targets:
            input_scales[t] = expand_scales(s, g, model)
    return input_scales
