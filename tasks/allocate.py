"""allocate: pick one storage format per tensor, minimising the summed sensitivity cost under a
global size budget — an exact 0/1 integer program solved by scipy's MILP interface to HiGHS.

Variables x[t,f] ∈ {0,1}; Σ_f x[t,f] = 1 per tensor; Σ bytes[t,f]·x[t,f] ≤ budget;
minimise Σ error[t,f]·x[t,f].
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import lil_matrix

from haloquant import HaloquantError
from haloquant.artifacts import read_json, write_json
from schemas.artifacts import AllocationResult, SensitivityTable, TensorChoice
from schemas.params import AllocationSpec

ALLOCATION_FILE = "allocation.json"
PLOT_FILE = "bits_per_layer.json"


def budget_bytes(spec: AllocationSpec, table: SensitivityTable) -> int:
    """Budget for the quantizable tensors, in bytes (total_bytes includes the float tensors)."""
    n_weights = sum(t.n_weights for t in table.tensors)
    if spec.budget.bits_per_weight is not None:
        return int(np.floor(spec.budget.bits_per_weight * n_weights / 8))
    return spec.budget.total_bytes - table.fixed_bytes


def allocate_bits(spec: AllocationSpec, table: SensitivityTable) -> AllocationResult:
    t0 = time.perf_counter()
    n_weights = sum(t.n_weights for t in table.tensors)
    min_bytes = sum(min(c.bytes for c in t.candidates.values()) for t in table.tensors)
    max_bytes = sum(max(c.bytes for c in t.candidates.values()) for t in table.tensors)
    budget = budget_bytes(spec, table)
    min_bpw = 8 * min_bytes / n_weights
    if budget < min_bytes:
        field = "bits_per_weight" if spec.budget.bits_per_weight is not None else "total_bytes"
        raise HaloquantError(
            f"allocation.budget.{field}: infeasible — the smallest allocation of formats "
            f"{table.formats} needs {min_bpw:.4f} bits per weight "
            f"({min_bytes + table.fixed_bytes} total bytes); raise the budget or add smaller formats"
        )

    # flatten the (tensor, format) pairs into MILP columns
    cols = [(i, f, c) for i, t in enumerate(table.tensors) for f, c in t.candidates.items()]
    cost = np.array([c.error for _, _, c in cols], dtype=np.float64)
    size = np.array([c.bytes for _, _, c in cols], dtype=np.float64)
    scale = max(cost.max(), 1e-30)  # keep HiGHS's tolerances meaningful
    one_hot = lil_matrix((len(table.tensors), len(cols)))
    for j, (i, _, _) in enumerate(cols):
        one_hot[i, j] = 1
    constraints = [
        LinearConstraint(one_hot.tocsr(), 1, 1),
        LinearConstraint(size[None, :], 0, min(budget, max_bytes)),
    ]
    res = milp(c=cost / scale, constraints=constraints, integrality=np.ones(len(cols)),
               bounds=Bounds(0, 1), options={"time_limit": spec.time_limit_s})
    if res.x is None:
        raise HaloquantError(f"allocation: the MILP solver found no solution ({res.message})")
    chosen = [cols[j] for j in np.flatnonzero(res.x > 0.5)]
    choices = []
    for i, f, c in sorted(chosen, key=lambda x: x[0]):
        t = table.tensors[i]
        choices.append(TensorChoice(name=t.name, gguf_name=t.gguf_name, format=f, bytes=c.bytes,
                                    bits_per_weight=8 * c.bytes / t.n_weights, error=c.error))
    used = sum(c.bytes for c in choices)
    assert len(choices) == len(table.tensors) and used <= budget
    return AllocationResult(
        solver=spec.solver, budget_bytes=budget, budget_spec=spec.budget.model_dump(exclude_none=True),
        used_bytes=used, total_bytes=used + table.fixed_bytes, bits_per_weight=8 * used / n_weights,
        objective=sum(c.error for c in choices), min_feasible_bits_per_weight=min_bpw, tensors=choices,
        seconds=time.perf_counter() - t0,
    )


def allocate(spec: AllocationSpec, sensitivity_dir: Path, out_dir: Path) -> AllocationResult:
    table = SensitivityTable.model_validate(read_json(sensitivity_dir / "sensitivity.json"))
    result = allocate_bits(spec, table)
    write_json(out_dir / ALLOCATION_FILE, result.model_dump())
    write_json(out_dir / PLOT_FILE, [
        {"index": i, "tensor": c.gguf_name, "bits_per_weight": round(c.bits_per_weight, 4), "format": c.format}
        for i, c in enumerate(result.tensors)
    ])
    return result
