"""The MILP allocation is exact, respects the budget, and names the smallest feasible budget."""

import itertools

import numpy as np
import pytest

from haloquant import HaloquantError
from schemas.artifacts import FormatCost, SensitivityTable, TensorSensitivity
from schemas.params import AllocationSpec
from tasks.allocate import allocate_bits

SIZES = {"Q4_0": 4.5, "Q5_0": 5.5, "Q8_0": 8.5}


def random_table(n_tensors=5, seed=0) -> SensitivityTable:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_tensors):
        n = int(rng.choice([1024, 2048, 4096]))
        base = rng.uniform(0.1, 10)
        cands = {f: FormatCost(bytes=int(n * b / 8), error=base * 2.0 ** (-2 * b) * rng.uniform(0.5, 2))
                 for f, b in SIZES.items()}
        rows.append(TensorSensitivity(name=f"t{i}", gguf_name=f"blk.{i}.x", kind="ffn_up", layer=i,
                                      shape=(n // 256, 256), n_weights=n, candidates=cands))
    return SensitivityTable(metric="output_error", formats=list(SIZES), fixed_bytes=100, tensors=rows, seconds=0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bpw", [4.6, 5.2, 6.5])
def test_milp_matches_brute_force(seed, bpw):
    table = random_table(seed=seed)
    res = allocate_bits(AllocationSpec(budget={"bits_per_weight": bpw}), table)
    n = sum(t.n_weights for t in table.tensors)
    best = min(
        (sum(t.candidates[f].error for t, f in zip(table.tensors, combo)), combo)
        for combo in itertools.product(SIZES, repeat=len(table.tensors))
        if sum(t.candidates[f].bytes for t, f in zip(table.tensors, combo)) <= int(bpw * n / 8)
    )
    assert res.objective == pytest.approx(best[0], rel=1e-6)
    assert res.used_bytes <= res.budget_bytes and res.bits_per_weight <= bpw


def test_total_bytes_budget_counts_float_tensors():
    table = random_table()
    smallest = sum(min(c.bytes for c in t.candidates.values()) for t in table.tensors) + table.fixed_bytes
    total = int(smallest * 1.2)
    res = allocate_bits(AllocationSpec(budget={"total_bytes": total}), table)
    assert res.total_bytes == res.used_bytes + table.fixed_bytes <= total
    assert res.total_bytes > smallest  # the extra room was used
    with pytest.raises(HaloquantError, match=rf"total_bytes: infeasible.*\({smallest} total bytes\)"):
        allocate_bits(AllocationSpec(budget={"total_bytes": smallest - 1}), table)


def test_infeasible_budget_names_smallest():
    table = random_table()
    with pytest.raises(HaloquantError, match=r"allocation.budget.bits_per_weight: infeasible.*needs 4.5000 bits"):
        allocate_bits(AllocationSpec(budget={"bits_per_weight": 4.0}), table)


@pytest.mark.parametrize("solver", ["greedy", "lagrangian"])
@pytest.mark.parametrize("seed", range(4))
def test_heuristic_solvers_are_feasible_and_near_exact(solver, seed):
    table = random_table(n_tensors=7, seed=seed)
    for bpw in (4.7, 5.5, 7.0):
        exact = allocate_bits(AllocationSpec(budget={"bits_per_weight": bpw}), table)
        res = allocate_bits(AllocationSpec(budget={"bits_per_weight": bpw}, solver=solver), table)
        assert res.used_bytes <= res.budget_bytes
        assert exact.objective <= res.objective * (1 + 1e-9)  # the MILP is optimal
        assert res.objective <= 3 * exact.objective


def test_rules_pin_and_floor():
    table = random_table(n_tensors=5)
    spec = AllocationSpec(budget={"bits_per_weight": 7.0}, rules=[
        {"match": "blk.0.*", "format": "Q8_0"}, {"match": "blk.[34].*", "min_bits": 5.5}])
    res = allocate_bits(spec, table)
    fmts = {c.gguf_name: c.format for c in res.tensors}
    assert fmts["blk.0.x"] == "Q8_0"
    assert fmts["blk.3.x"] in ("Q5_0", "Q8_0") and fmts["blk.4.x"] in ("Q5_0", "Q8_0")
    with pytest.raises(HaloquantError, match=r"allocation.rules.0: leaves tensor blk.0.x no candidate"):
        allocate_bits(AllocationSpec(budget={"bits_per_weight": 6.0}, rules=[{"match": "blk.0.*", "format": "F16"}]),
                      table)
    with pytest.raises(HaloquantError, match="under allocation.rules"):
        allocate_bits(AllocationSpec(budget={"bits_per_weight": 4.6}, rules=[{"match": "*", "min_bits": 8}]), table)
