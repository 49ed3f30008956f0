"""Budget arithmetic: which formats a tensor can take, what an allocation budget is in bytes of
quantizable tensor data, and the smallest allocation — shared by the allocate stage and by the
plan_widening stage's `rotate.widen: auto` (is the budget feasible at the checkpoint's widths?), which needs it before
anything is measured."""

from __future__ import annotations

import fnmatch

import numpy as np

from haloquant import HaloquantError
from haloquant.formats import QuantFormat, get_format
from haloquant.modelio import quantizable_tensors
from haloquant.schemas.artifacts import FormatCost, SensitivityTable, TensorSensitivity
from haloquant.schemas.params import AllocationSpec, SensitivitySpec

Candidates = list[dict[str, FormatCost]]


def candidate_formats(spec: SensitivitySpec, shape: tuple[int, int]) -> list[QuantFormat]:
    """The listed formats that fit the tensor's rows, and where one of them does not (rows that
    are not a multiple of 256 for the k-quants), the fallback formats that do — llama.cpp's own
    fallbacks for such widths."""
    listed = [get_format(f) for f in spec.formats]
    out = [f for f in listed if f.supports(shape)]
    if len(out) < len(listed):
        out += [g for g in map(get_format, spec.fallback_formats) if g.supports(shape) and g not in out]
    return out


def budget_bytes(spec: AllocationSpec, table: SensitivityTable) -> int:
    """Budget for the quantizable tensors, in bytes (total_bytes includes the float tensors; the
    file budgets also the GGUF's metadata and alignment, as measured by the sensitivity stage)."""
    b = spec.budget
    if b.bits_per_weight is not None:
        return int(np.floor(b.bits_per_weight * table.checkpoint_weights / 8))
    if b.total_bytes is not None:
        return b.total_bytes - table.fixed_bytes
    if table.gguf_overhead_bytes == 0:
        raise HaloquantError(f"allocation.budget.{b.field}: the sensitivity table has no GGUF overhead measured "
                             "(re-run the sensitivity stage)")
    file_bytes = b.file_bytes if b.file_bytes is not None else int(b.file_mb * 1_000_000)
    return file_bytes - table.gguf_overhead_bytes - table.fixed_bytes


def apply_rules(spec: AllocationSpec, table: SensitivityTable) -> Candidates:
    """Each tensor's candidates that allocation.rules leave it (a rule that leaves none is an error)."""
    cands = [dict(t.candidates) for t in table.tensors]
    for i, rule in enumerate(spec.rules):
        for t, c in zip(table.tensors, cands):
            if not fnmatch.fnmatch(t.gguf_name, rule.match):
                continue
            keep = {f: v for f, v in c.items()
                    if (rule.format is None or f == rule.format)
                    and (rule.min_bits is None or get_format(f).bits_per_weight >= rule.min_bits)}
            if not keep:
                raise HaloquantError(f"allocation.rules.{i}: leaves tensor {t.gguf_name} no candidate format "
                                     f"(candidates: {sorted(c)})")
            c.clear()
            c.update(keep)
    return cands


def smallest_bytes(cands: Candidates) -> int:
    """The smallest allocation's bytes: each tensor in its smallest candidate."""
    return sum(min(c.bytes for c in cs.values()) for cs in cands)


def sizes_table(skeleton, sensitivity: SensitivitySpec, source_weights: int, overhead: int) -> SensitivityTable:
    """A sensitivity table of this model's candidate formats with their bytes and no errors: what the
    allocation's budget and smallest size are computed from, before anything is measured."""
    infos = quantizable_tensors(skeleton)
    rows = [TensorSensitivity(name=t.name, gguf_name=t.gguf_name, kind=t.kind, layer=t.layer, shape=t.shape,
                              n_weights=t.n_weights, candidates={f.name: FormatCost(bytes=f.storage_bytes(t.shape),
                                                                                   error=0.0)
                                                                 for f in candidate_formats(sensitivity, t.shape)})
            for t in infos]
    floats = sum(p.numel() * 4 for p in skeleton.parameters() if p.ndim != 2)
    return SensitivityTable(metric="none", formats=sensitivity.formats, fixed_bytes=floats, tensors=rows,
                            gguf_overhead_bytes=overhead,
                            source_weight_ratio=min(1.0, source_weights / sum(t.n_weights for t in infos)))


def fits(table: SensitivityTable, allocation: AllocationSpec) -> tuple[bool, float]:
    """(whether the budget holds the smallest allocation, that allocation's bits per checkpoint weight)."""
    smallest = smallest_bytes(apply_rules(allocation, table))
    return budget_bytes(allocation, table) >= smallest, 8 * smallest / table.checkpoint_weights
