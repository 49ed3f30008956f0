"""plan_widening: whether the `rotate` stage widens the checkpoint's residual stream to whole 256-blocks.

`rotate.widen: auto` widens exactly when the allocation budget cannot be met at the checkpoint's widths
(the smallest allocation of sensitivity.formats, their block-32 fallbacks and allocation.rules is larger)
and can be met widened: widening costs D/d of every stream-reading matrix, so where the budget is
feasible unwidened the checkpoint does better (bench/results/widening_real_models_2026-12-07.md).

A stage of its own because the decision reads the budget and the candidate formats, which the copy does
not: a budget edit re-runs this (shapes only, seconds), and `rotate` re-runs only when the decision
changes — a rotated copy is not rewritten for a budget that widens it no differently.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from haloquant.artifacts import write_json
from haloquant.budget import fits, sizes_table
from haloquant.families import family_of_architecture
from haloquant.gguf_writer import gguf_add_bos, gguf_overhead_bytes
from haloquant.kquants import QK_K  # the k-quant and i-quant block: rows of whole blocks take every format
from haloquant.modelio import check_model_dir, model_name, model_skeleton, quantizable_tensors, read_config
from haloquant.schemas.artifacts import WideningPlan
from haloquant.schemas.params import AllocationSpec, ModelSpec, RotateSpec, SensitivitySpec
from haloquant.widening import widened_skeleton, widened_width

log = logging.getLogger(__name__)


def smallest_bits(model_spec: ModelSpec, sensitivity: SensitivitySpec,
                  allocation: AllocationSpec) -> tuple[bool, float, bool, float]:
    """(feasible at the checkpoint's widths, its smallest allocation's bits per checkpoint weight,
    feasible widened, the widened copy's), from the shapes alone."""
    checkpoint = model_skeleton(model_spec.path)
    infos = quantizable_tensors(checkpoint)
    weights = sum(t.n_weights for t in infos)
    overhead = 0
    if allocation.budget.field in ("file_bytes", "file_mb"):  # the same metadata either way (an upper bound)
        shapes = {t.gguf_name: t.shape for t in infos}
        floats = {n: np.zeros(p.shape, np.float32) for n, p in checkpoint.named_parameters() if p.ndim != 2}
        overhead = gguf_overhead_bytes(Path(model_spec.path), shapes, floats, model_name(model_spec.path),
                                       gguf_add_bos(model_spec))
    ok, bpw = fits(sizes_table(checkpoint, sensitivity, weights, overhead), allocation)
    ok_wide, bpw_wide = fits(sizes_table(widened_skeleton(model_spec.path, QK_K), sensitivity, weights, overhead),
                             allocation)
    return ok, bpw, ok_wide, bpw_wide


def hidden_width(model_spec: ModelSpec) -> int | None:
    hidden = read_config(model_spec.path).get("hidden_size")
    return hidden if isinstance(hidden, int) else None


def stream_is_whole(model_spec: ModelSpec) -> bool:
    """Whether the checkpoint's hidden width is whole 256-blocks already (nothing to widen)."""
    hidden = hidden_width(model_spec)
    return hidden is None or widened_width(hidden, QK_K) == hidden


def plan(model_spec: ModelSpec, spec: RotateSpec, sensitivity: SensitivitySpec,
         allocation: AllocationSpec) -> WideningPlan:
    """The decision and why: never at whole 256-blocks or with widen false, always with true, and with
    auto when the budget needs it (a family that cannot be widened: never)."""
    hidden = hidden_width(model_spec)
    if stream_is_whole(model_spec):
        return WideningPlan(widen=False, reason=f"hidden width {hidden} is whole {QK_K}-blocks")
    target = [hidden, widened_width(hidden, QK_K)]
    if spec.widen is False:
        return WideningPlan(widen=False, reason="rotate.widen: false")
    if spec.widen is True:
        return WideningPlan(widen=True, hidden=target, reason="rotate.widen: true")
    arch = (read_config(model_spec.path).get("architectures") or [None])[0]
    if not family_of_architecture(arch).widenable:
        return WideningPlan(widen=False, reason=f"rotate.widen auto: {arch} cannot be widened")
    ok, bpw, ok_wide, bpw_wide = smallest_bits(model_spec, sensitivity, allocation)
    widen = not ok and ok_wide
    reason = (f"rotate.widen auto: the smallest allocation needs {bpw:.3f} bits per weight at width {hidden}, "
              f"{bpw_wide:.3f} at {target[1]}; the budget is " +
              ("met as it is" if ok else "met only widened" if ok_wide else "infeasible either way"))
    log.info(reason)
    return WideningPlan(widen=widen, hidden=target if widen else None, reason=reason, smallest_bits=bpw,
                        smallest_bits_widened=bpw_wide)


def plan_widening(model_spec: ModelSpec, spec: RotateSpec, sensitivity: SensitivitySpec,
                  allocation: AllocationSpec, plan_file: Path) -> WideningPlan:
    check_model_dir(model_spec.path)
    result = plan(model_spec, spec, sensitivity, allocation)
    write_json(plan_file, result.model_dump())
    return result
