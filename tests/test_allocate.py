"""The MILP allocation is exact, respects the budget, and names the smallest feasible budget."""

import itertools

import numpy as np
import pytest

from haloquant import HaloquantError
from haloquant.schemas.artifacts import FormatCost, SensitivityTable, TensorSensitivity
from haloquant.schemas.params import AllocationSpec
from haloquant.tasks.allocate import allocate_bits

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
    return SensitivityTable(metric="output_error", formats=list(SIZES), fixed_bytes=100, tensors=rows)


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
    with pytest.raises(HaloquantError, match=rf"total_bytes: infeasible.*\({smallest} total bytes of tensor data\)"):
        allocate_bits(AllocationSpec(budget={"total_bytes": smallest - 1}), table)


def test_infeasible_budget_names_smallest():
    table = random_table()
    with pytest.raises(HaloquantError, match=r"allocation.budget.bits_per_weight: infeasible.*needs 4.5000 bits") as e:
        allocate_bits(AllocationSpec(budget={"bits_per_weight": 4.0}), table)
    # and names the registered formats that would go lower: every one under Q4_0's 4.5 bits, none at or above it
    hint = str(e.value).split("add smaller formats to sensitivity.formats: ")[1]
    assert hint.startswith("IQ1_S (1.562 bpw), IQ1_M (1.75 bpw), IQ2_XXS (2.062 bpw)") and "IQ4_XS (4.25 bpw)" in hint
    assert "Q2_K (2.625 bpw)" in hint and "Q4_K" not in hint and "IQ4_NL" not in hint and "Q4_0" not in hint


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


def test_file_size_budget_fits_the_written_gguf(tmp_path):
    """allocation.budget.file_mb: the GGUF written from the allocation, metadata and alignment
    included, fits in N MB and uses most of it (ref-llama-tiny, k-quant candidates)."""
    from haloquant.schemas.params import CalibrationSpec, FoldSpec, GGUFSpec, ModelSpec, QuantizeSpec, SensitivitySpec
    from haloquant.tasks.allocate import allocate
    from haloquant.tasks.calibrate import calibrate
    from haloquant.tasks.export_gguf import export_gguf
    from haloquant.tasks.quantize import quantize
    from haloquant.tasks.scale_fold import scale_fold
    from haloquant.tasks.sensitivity import score_sensitivity

    from tests.conftest import CALIB_TEXT, TINY

    spec = ModelSpec(path=TINY, device="cpu", add_bos=True)  # the reference models start with BOS
    calibrate(spec, CalibrationSpec(text=CALIB_TEXT, n_sequences=4, seq_len=64), tmp_path / "cal")
    table = score_sensitivity(spec, SensitivitySpec(formats=["Q3_K", "Q4_K", "Q5_K", "Q6_K"], metric="output_error"),
                              QuantizeSpec(), tmp_path / "cal", tmp_path / "sens")
    assert 0 < table.gguf_overhead_bytes < 2_000_000
    for mb in (2.6, 3.1):
        d = tmp_path / str(mb)
        res = allocate(AllocationSpec(budget={"file_mb": mb}), tmp_path / "sens", d / "alloc")
        scale_fold(spec, FoldSpec(), tmp_path / "cal", d / "alloc", d / "fold")
        quantize(spec, QuantizeSpec(), tmp_path / "cal", d / "alloc", d / "fold", d / "q")
        export_gguf(spec, GGUFSpec(), d / "q", d / "gguf")
        size = (d / "gguf" / "model.gguf").stat().st_size
        assert size <= mb * 1_000_000
        assert size > mb * 1_000_000 - 70_000  # within one upgrade step (~ a Q3_K→Q4_K FFN tensor) + padding
        assert res.total_bytes + table.gguf_overhead_bytes <= mb * 1_000_000
    with pytest.raises(HaloquantError, match=r"allocation.budget.file_mb: infeasible.*as a GGUF file"):
        allocate(AllocationSpec(budget={"file_mb": 1.0}), tmp_path / "sens", tmp_path / "x")
