"""Widening: the residual stream padded with zero channels to a whole number of 256-wide blocks, so
that the linears reading it can take k-quants and i-quants.

A k-quant or i-quant block holds 256 consecutive weights of a row, so llama.cpp can only store a
tensor in those formats when its rows are a multiple of 256 wide. Small models often are not: hidden
576 (SmolLM2-135M), 960 (SmolLM2-360M), 896 (Qwen2.5-0.5B), 640 and 1152 (Gemma 3 270M, 1B). There
every linear that reads the stream (q, k, v, gate, up), the embedding and the head are held to the
block-32 formats, ≥ 4.5 bits per weight: no file of these models gets below ~4.5 bpw, whatever the
quantizer. Widened from d to D channels (the next multiple of 256) they take every format.

The attention's width (query heads × head_dim, the rows of q and the columns of o) is whole blocks
too only if the heads fill them: SmolLM2-135M's 9 × 64 = 576 and Qwen2.5-0.5B's 14 × 64 = 896 do not.
Zero query heads are added, within each kv head's group (GQA: query head j reads kv head j // n_rep),
up to the fewest that make it whole: 9 → 12 (3 kv heads, 4 per group), 14 → 16 (2 kv heads, 8 per
group). A zero head's query is zero, so it attends uniformly and returns the mean of its group's values
— which o's zero columns for it discard. The KV cache is unchanged.

Exact: the stream x becomes [x, 0]. The embedding and every linear that writes the stream (o, down)
get zero rows/columns for the new channels; every linear that reads it gets zero columns (they read
zeros, so any value would do). An RMSNorm over D channels of [x, 0] sees mean(x²)·d/D, so with
ε' = ε·d/D (one ε for the model: config.rms_norm_eps) and weight √(d/D)·w it computes the same
output, zero in the new channels. Gemma's (1 + w) norms take the same rule on 1 + w; its embedding
is multiplied by √hidden, so its rows are scaled by √(d/D) (and a tied head's logits made whole
again through the final norm). Head geometry is kept by writing head_dim into the config (llama.cpp's
converter writes it as the key/value length).

What it costs: D/d times the bytes and multiply-adds of every matrix (576 → 768: ×1.33; 896 → 1024:
×1.14; q and o once more by the added heads), so it pays only where the formats it opens are that much
smaller: below ~4 bits per weight. The bits-per-weight budget counts the checkpoint's
weights (widening.json holds both counts), so a widened model gets the same file size as an unwidened
one at the same budget.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from haloquant import HaloquantError
from haloquant.families import Family
from haloquant.families.base import head_dim
from haloquant.rewrite import read_source, rewrite_folder

REPORT = "widening.json"
EPS_KEYS = ("rms_norm_eps",)


def widened_width(hidden: int, multiple: int) -> int:
    return -(-hidden // multiple) * multiple


def check_widenable(fam: Family, arch: str) -> None:
    if not fam.widenable:
        raise HaloquantError(f"widening: llama.cpp's converter derives {arch}'s head geometry from hidden_size, so a "
                             "widened stream would not load; its widths are multiples of 256 already")


@dataclass
class WideningPlan:
    """What happens to each named tensor (HF parameter names) when the stream goes from d to D channels."""

    fam: Family
    d: int
    D: int
    tied: bool
    heads: tuple[int, int] = (0, 0)  # query heads before and after (equal: none added)
    n_kv: int = 1
    hd: int = 0
    queries: set[str] = field(default_factory=set)  # q weights and biases: rows are query heads
    attention_outs: set[str] = field(default_factory=set)  # o weights: columns are query heads
    readers: set[str] = field(default_factory=set)  # weights whose columns read the stream
    writers: set[str] = field(default_factory=set)  # weights (rows) and biases whose outputs join the stream
    norms: set[str] = field(default_factory=set)  # norms over the stream

    @property
    def ratio(self) -> float:
        return self.d / self.D

    def embedding_factor(self) -> float:
        """Gemma multiplies looked-up rows by √hidden, which grows with the width: the rows shrink to match."""
        return self.fam.embedding_scale(SimpleNamespace(hidden_size=self.d)) / \
            self.fam.embedding_scale(SimpleNamespace(hidden_size=self.D))

    def head_slots(self) -> list[int]:
        """For each new query head, the old head it is (−1: an added zero head); each kv group's old heads
        first, then its added ones."""
        (h, h2), n_kv = self.heads, self.n_kv
        rep, rep2 = h // n_kv, h2 // n_kv
        return [g * rep + i if i < rep else -1 for g in range(n_kv) for i in range(rep2)]

    def _spread_heads(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """`t` with its query-head axis `dim` (heads × head_dim) laid out as head_slots(), zeros in added heads."""
        slots = self.head_slots()
        shape = list(t.shape)
        shape[dim] = len(slots) * self.hd
        out = torch.zeros(shape, dtype=torch.float64)
        for new, old in enumerate(slots):
            if old >= 0:
                out.narrow(dim, new * self.hd, self.hd).copy_(t.double().narrow(dim, old * self.hd, self.hd))
        return out

    def widen(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The widened tensor `name` (float64), or `t` itself where neither width enters."""
        if self.heads[1] != self.heads[0]:
            if name in self.queries:
                t = self._spread_heads(t, 0)
            elif name in self.attention_outs:
                t = self._spread_heads(t, 1)
        pad = self.D - self.d
        if name == f"{self.fam.embedding}.weight":
            return torch.nn.functional.pad(t.double() * self.embedding_factor(), (0, pad))
        if name in self.readers:
            return torch.nn.functional.pad(t.double(), (0, pad))
        if name in self.writers:
            return torch.nn.functional.pad(t.double(), (0, 0, 0, pad) if t.ndim == 2 else (0, pad))
        if name in self.norms:
            gain = math.sqrt(self.ratio)
            if self.tied and name == f"{self.fam.final_norm}.weight":
                gain /= self.embedding_factor()  # the tied head is the scaled embedding
            off = self.fam.norm_offset
            return torch.nn.functional.pad((off + t.double()) * gain, (0, pad)) - off  # new channels: gain 0
        return t


def padded_heads(heads: int, n_kv: int, hd: int, multiple: int) -> int:
    """The fewest query heads ≥ `heads`, a multiple of the kv heads, whose width is whole blocks (`heads`
    itself if none up to twice as many)."""
    return next((h for h in range(heads, 2 * heads + 1) if h % n_kv == 0 and h * hd % multiple == 0), heads)


def plan_for(fam: Family, cfg, multiple: int) -> WideningPlan:
    d, hd = cfg.hidden_size, head_dim(cfg)
    n_kv = cfg.num_key_value_heads or cfg.num_attention_heads
    plan = WideningPlan(fam, d, widened_width(d, multiple), bool(getattr(cfg, "tie_word_embeddings", False)),
                        (cfg.num_attention_heads, padded_heads(cfg.num_attention_heads, n_kv, hd, multiple)), n_kv, hd)
    for i in range(cfg.num_hidden_layers):
        p = fam.layer(i)
        plan.queries.update(f"{p}.{fam.query}.{x}" for x in ("weight", "bias"))
        plan.attention_outs.add(f"{p}.{fam.attention_out}.weight")
        for f in fam.norm_feeds:
            plan.norms.add(f"{p}.{f.norm}.weight")
            plan.readers.update(f"{p}.{t}.weight" for t in f.linears)
        plan.norms.update(f"{p}.{n}.weight" for n in fam.post_norms)
        plan.writers.update(f"{p}.{w}.{x}" for w in fam.residual_writers for x in ("weight", "bias"))
    plan.norms.add(f"{fam.final_norm}.weight")
    plan.readers.add(f"{fam.head}.weight")
    return plan


def widened_config(config: dict, cfg, plan: WideningPlan) -> dict:
    """config.json of the widened model: hidden_size D, head_dim explicit, the query heads, ε scaled by d/D."""
    if "text_config" in config:
        raise HaloquantError("widening: a config with a nested text_config is not supported")
    eps = next((k for k in EPS_KEYS if k in config), None)
    if eps is None:
        raise HaloquantError(f"widening: config.json has no {' or '.join(EPS_KEYS)} (the RMSNorm ε it rescales)")
    return config | {"hidden_size": plan.D, "head_dim": head_dim(cfg), "num_attention_heads": plan.heads[1],
                     eps: config[eps] * plan.ratio}


def _source_plan(src: str | Path, multiple: int) -> tuple[Path, object, WideningPlan]:
    """(folder, transformers config, plan) of a folder to widen; a family that cannot be is refused."""
    src, cfg, arch, fam = read_source(src, "widening")
    check_widenable(fam, arch)
    return src, cfg, plan_for(fam, cfg, multiple)


def widened_skeleton(src: str | Path, multiple: int = 256):
    """The widened model's modules and parameter shapes, without weights (on the meta device): what
    `write_widened` would write, for sizing it before deciding to."""
    from transformers import AutoModelForCausalLM

    _, cfg, plan = _source_plan(src, multiple)
    wide = type(cfg).from_dict(widened_config(cfg.to_dict(), cfg, plan))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(wide)


def write_widened(src: str | Path, out: str | Path, multiple: int = 256, dtype: torch.dtype | None = None) -> dict:
    """A copy of the HF folder `src` in `out` with the stream widened to a multiple of `multiple`
    (`dtype`: of the widened tensors; None: each source tensor's own). Returns the report, also written
    to `out`/widening.json. A width that is a multiple already is refused (nothing to do)."""
    from haloquant.modelio import read_config

    src, cfg, plan = _source_plan(src, multiple)
    out = Path(out)
    if plan.D == plan.d:
        raise HaloquantError(f"widening: hidden width {plan.d} is a multiple of {multiple} already")
    config = widened_config(read_config(src), cfg, plan)
    weights = {"source": 0, "widened": 0}  # elements of the matrices, before and after

    def transform(name: str, t: torch.Tensor, read) -> dict[str, torch.Tensor]:
        if not t.is_floating_point():
            return {name: t}
        w = plan.widen(name, t)
        if t.ndim == 2:
            weights["source"] += t.numel()
            weights["widened"] += w.numel()
        return {name: t if w is t else w.to(dtype or t.dtype)}

    report = {"source": src.name, "hidden": [plan.d, plan.D], "heads": list(plan.heads), "multiple": multiple,
              "weights": weights}
    rewrite_folder(src, out, transform, config, report, REPORT, "widening")
    return report


def source_weight_ratio(model_dir: str | Path) -> float:
    """Weights of the checkpoint per weight of this folder's matrices: 1 unless the folder was widened
    (its widening.json, kept by a rotation after it)."""
    f = Path(model_dir) / REPORT
    if not f.is_file():
        return 1.0
    w = json.loads(f.read_text())["weights"]
    return w["source"] / w["widened"]
