"""RAMP's per-layer embedding: 11 numbers per quantizable tensor that describe how it will take
quantization, from calibration statistics, weight statistics and structure alone (no encode, no
forward pass), so that a policy trained on one model can be applied to any other.

Every feature is scale-free (a ratio, a log-ratio, a fraction or a relative position), so models
of any width, depth or activation scale land in the same ranges (roughly [-3, 3]):

| # | name            | definition (x: the tensor's input activations, W its weight, G = E[x xᵀ]) |
|---|-----------------|----------------------------------------------------------------------------|
| 0 | depth           | block index / (blocks − 1); embedding / output head: 1 (the head is last) |
| 1 | kind            | role code: q, k, v, o, gate, up, down, embedding/head → 0, 1/7, …, 1     |
| 2 | fan_in_ratio    | log2(in_features / hidden_size): 2 for down_proj of a 4× FFN, else 0     |
| 3 | param_share     | ln(weights of this tensor / mean weights per quantizable tensor)         |
| 4 | act_peak        | ln(max_j max|x_j| / rms(x)): how far the largest activation sits out     |
| 5 | act_outliers    | fraction of input channels whose rms exceeds 4× the median channel's     |
| 6 | act_concentration | ln(mean_j e_j² / (mean_j e_j)²), e_j = E[x_j²]: energy in few channels |
| 7 | act_anisotropy  | ln(λ_max(G) · d / tr G): 0 for isotropic inputs, large for one direction |
| 8 | w_kurtosis      | ln(kurtosis of W's entries) (Gaussian: ln 3)                              |
| 9 | w_peak          | ln(max|W| / std W): what the block scales must cover                    |
| 10 | hessian_proxy  | ln(tr G · mean W² · out_features) minus its median over the model: the   |
|   |                 | HAWQ trace × weight power, relative to the model's typical tensor       |

For a tied embedding the activation features are those of the output head's input (what the
weight multiplies as the head), matching how sensitivity and calibration treat it.
"""

from __future__ import annotations

import math
import statistics

import torch

from haloquant.arrays import row_chunks
from haloquant.calibstats import CalibrationStats
from haloquant.modelio import TensorInfo

FEATURES = ("depth", "kind", "fan_in_ratio", "param_share", "act_peak", "act_outliers", "act_concentration",
            "act_anisotropy", "w_kurtosis", "w_peak", "hessian_proxy")
KIND_ORDER = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "token_embd")
# roles outside Llama's, coded as the role they stand first in (a fused qkv_proj starts with q rows)
KIND_ALIASES = {"output": "token_embd", "attn_qkv": "attn_q"}
_EPS = 1e-12


def _top_eigenvalue(g: torch.Tensor, iters: int = 50) -> float:
    """Largest eigenvalue of a PSD matrix by power iteration (cheap for any width)."""
    v = torch.ones(g.shape[0], dtype=torch.float64, device=g.device) / math.sqrt(g.shape[0])
    g = g.double()
    lam = 0.0
    for _ in range(iters):
        w = g @ v
        lam = float(w.norm())
        if lam <= _EPS:
            return 0.0
        v = w / lam
    return lam


def weight_moments(w: torch.Tensor) -> tuple[float, float, float, float]:
    """(standard deviation + ε, kurtosis, max |w|, mean w²) in float64. A matrix within
    haloquant.arrays.row_chunks' budget is taken whole (the numbers of every model so far); a larger
    one (a 128k-vocabulary head) in two passes over row chunks, so that no float64 copy of the whole
    tensor is made — four of them took 17 GiB of an H100 for Llama-3-8B's head."""
    chunks = row_chunks(w.shape[0], w[0].numel())
    if len(chunks) == 1:
        w = w.double()
        centred = w - w.mean()
        kurt = float(centred.pow(4).mean()) / (float(centred.pow(2).mean()) ** 2 + _EPS)
        return float(w.std()) + _EPS, kurt, float(w.abs().max()), float(w.pow(2).mean())
    n = w.numel()
    total = square = abs_max = 0.0
    for rows in chunks:
        c = w[rows].double()
        total, square = total + float(c.sum()), square + float(c.pow(2).sum())
        abs_max = max(abs_max, float(c.abs().max()))
    mean = total / n
    m2 = m4 = 0.0
    for rows in chunks:
        c = w[rows].double() - mean
        m2, m4 = m2 + float(c.pow(2).sum()), m4 + float(c.pow(4).sum())
    return math.sqrt(m2 / (n - 1)) + _EPS, (m4 / n) / ((m2 / n) ** 2 + _EPS), abs_max, square / n


def tensor_features(t: TensorInfo, w: torch.Tensor, stats: CalibrationStats, n_layers: int,
                    hidden: int, mean_weights: float, gram: torch.Tensor | None = None) -> list[float]:
    """The first ten features (the eleventh needs the whole model: see `layer_embeddings`).
    Computed where `w` is (`gram`: the input's E[xxᵀ] there, default the statistics'): on a GPU,
    not the host: for one Llama-3-8B block this 2-core CPU takes 22 s (float64 moments of 218 M
    weights, power iterations on 4096- and 14336-wide Hessians) — likely most of the ≈ 24 s per
    block the sensitivity stage took on an H100's host (bench/results/scale_h100_streamed.md)."""
    g = (stats.gram(t) if gram is None else gram).to(w.device).double()
    e = torch.diagonal(g).clamp_min(0)
    rms = math.sqrt(float(e.mean()) + _EPS)
    ch_rms = e.sqrt()
    kind = KIND_ALIASES.get(t.kind, t.kind)
    std, kurt, abs_max, mean_square = weight_moments(w)
    return [
        1.0 if t.layer < 0 else t.layer / max(n_layers - 1, 1),
        KIND_ORDER.index(kind) / (len(KIND_ORDER) - 1),
        math.log2(t.shape[1] / hidden),
        math.log(t.n_weights / mean_weights),
        math.log(float(stats.max_abs(t).max()) / rms + _EPS),
        float((ch_rms > 4 * ch_rms.median()).double().mean()),
        math.log(float(e.pow(2).mean()) / (float(e.mean()) ** 2 + _EPS) + _EPS),
        math.log(_top_eigenvalue(g) * g.shape[0] / (float(e.sum()) + _EPS) + _EPS),
        math.log(kurt + _EPS),
        math.log(abs_max / std + _EPS),
        math.log(float(e.sum()) * mean_square * t.shape[0] + _EPS),  # made relative below
    ]


def relative_sizes(rows: list[list[float]]) -> list[list[float]]:
    """The eleventh feature made relative to the model's median tensor (in place; returns `rows`)."""
    median = statistics.median(r[10] for r in rows)
    for r in rows:
        r[10] -= median
    return rows


def layer_embeddings(tensors: list[TensorInfo], weights: dict[str, torch.Tensor], stats: CalibrationStats,
                     n_layers: int, hidden: int) -> list[list[float]]:
    """One 11-vector per tensor, in the order given (model order: one pass over the blocks' Hessians)."""
    mean_weights = sum(t.n_weights for t in tensors) / len(tensors)
    return relative_sizes([tensor_features(t, weights[t.name], stats, n_layers, hidden, mean_weights)
                           for t in tensors])
