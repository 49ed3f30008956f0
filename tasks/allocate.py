"""allocate: pick one storage format per tensor, minimising the summed sensitivity cost under a
global size budget.

Solvers:
- `milp` (default): exact 0/1 program, scipy's MILP interface to HiGHS. Variables x[t,f] ∈ {0,1};
  Σ_f x[t,f] = 1 per tensor; Σ bytes[t,f]·x[t,f] ≤ budget; minimise Σ cost[t,f]·x[t,f].
- `lagrangian`: BAQ-style closed form — each tensor independently minimises cost + λ·bytes; λ is
  bisected to the smallest value within budget, then left-over bytes go to the best upgrades.
- `greedy`: from the smallest formats, repeatedly take the upgrade with the largest cost drop per
  byte that still fits.
- `sac`: RAMP's learned policy (`allocation.policy`, from the train_policy stage) reads each
  tensor's layer embedding and picks its bits; no costs needed (works with sensitivity.metric none),
  a repair step keeps it within budget (haloquant/policy.py).
Per-tensor `rules` pin tensors to a format or give them a floor in bits per weight.
The budget counts the GGUF; `onnx_budget` (milp) also bounds the ONNX export's quantized weights,
whose bytes per format differ (haloquant/onnx_layout.py): one allocation, both files within budget.
Every allocation reports both files' weight bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import lil_matrix

from haloquant import HaloquantError
from haloquant.artifacts import read_artifact, write_json
from haloquant.budget import Candidates, apply_rules, budget_bytes, smallest_bytes
from haloquant.formats import FORMATS
from haloquant.onnx_layout import onnx_weight_bytes
from haloquant.schemas.artifacts import AllocationResult, LayerEmbeddings, SensitivityTable, TensorChoice
from haloquant.schemas.params import AllocationSpec, ModelSpec, QuantizeSpec

ALLOCATION_FILE = "allocation.json"
EMBEDDINGS_FILE = "embeddings.json"
PLOT_FILE = "bits_per_layer.json"


def onnx_sizes(table: SensitivityTable, cands: Candidates) -> list[dict[str, int]]:
    """Each candidate's bytes in the ONNX export: an embedding is a lookup (and, tied, the head too)."""
    tied = not any(t.kind == "output" for t in table.tensors)
    uses = ["linear" if t.kind != "token_embd" else "tied" if tied else "gather" for t in table.tensors]
    return [{f: onnx_weight_bytes(f, tuple(t.shape), use) for f in cs} for t, cs, use in zip(table.tensors, cands, uses)]


def _solve_milp(cands: Candidates, budget: int, time_limit: float,
                second: tuple[list[dict[str, int]], int] | None = None) -> list[str]:
    """`second`: per-candidate sizes and a budget of another file that must fit too (ONNX)."""
    cols = [(i, f, c) for i, cs in enumerate(cands) for f, c in cs.items()]
    cost = np.array([c.error for _, _, c in cols], dtype=np.float64)
    size = np.array([c.bytes for _, _, c in cols], dtype=np.float64)
    scale = max(cost.max(), 1e-30)  # keep HiGHS's tolerances meaningful
    one_hot = lil_matrix((len(cands), len(cols)))
    for j, (i, _, _) in enumerate(cols):
        one_hot[i, j] = 1
    constraints = [LinearConstraint(one_hot.tocsr(), 1, 1), LinearConstraint(size[None, :], 0, budget)]
    if second is not None:
        sizes, cap = second
        constraints.append(LinearConstraint(np.array([[sizes[i][f] for i, f, _ in cols]], dtype=np.float64), 0, cap))
    res = milp(c=cost / scale, constraints=constraints, integrality=np.ones(len(cols)), bounds=Bounds(0, 1),
               options={"time_limit": time_limit})
    if res.x is None:
        if second is not None and res.status == 2:
            smallest = sum(min(s.values()) for s in second[0])
            raise HaloquantError(f"allocation.onnx_budget: infeasible — no allocation fits both the budget ({budget} "
                                 f"bytes) and the ONNX budget ({second[1]} bytes of ONNX weights); the smallest ONNX "
                                 f"weights of these formats alone take {smallest} bytes ({smallest / budget:.3f} × "
                                 "the budget): raise allocation.onnx_budget or the budget")
        raise HaloquantError(f"allocation: the MILP solver found no solution ({res.message})")
    picks = {cols[j][0]: cols[j][1] for j in np.flatnonzero(res.x > 0.5)}
    return [picks[i] for i in range(len(cands))]


def _fill_greedy(cands: Candidates, picks: list[str], budget: int) -> list[str]:
    """Upgrade tensors by the best cost drop per extra byte while anything still fits."""
    picks = list(picks)
    used = sum(cands[i][f].bytes for i, f in enumerate(picks))
    while True:
        best, best_gain = None, 0.0
        for i, f in enumerate(picks):
            cur = cands[i][f]
            for g, c in cands[i].items():
                extra = c.bytes - cur.bytes
                if extra > 0 and used + extra <= budget and cur.error > c.error:
                    gain = (cur.error - c.error) / extra
                    if gain > best_gain:
                        best, best_gain = (i, g), gain
        if best is None:
            return picks
        i, g = best
        used += cands[i][g].bytes - cands[i][picks[i]].bytes
        picks[i] = g


def _cheapest(cands: Candidates) -> list[str]:
    return [min(c, key=lambda f: (c[f].bytes, c[f].error)) for c in cands]


def _solve_lagrangian(cands: Candidates, budget: int) -> list[str]:
    def pick(lam: float) -> list[str]:
        return [min(c, key=lambda f: (c[f].error + lam * c[f].bytes, c[f].bytes)) for c in cands]

    def used(p: list[str]) -> int:
        return sum(cands[i][f].bytes for i, f in enumerate(p))

    lo, hi = 0.0, 1.0
    while used(pick(hi)) > budget and hi < 1e30:
        hi *= 4
    if used(pick(hi)) > budget:
        return _fill_greedy(cands, _cheapest(cands), budget)
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if used(pick(mid)) <= budget else (mid, hi)
    return _fill_greedy(cands, pick(hi), budget)


def require_costs(solver: str, metric: str) -> None:
    """Every solver but sac optimises the measured costs: refuse an unmeasured table."""
    if metric == "none" and solver != "sac":
        raise HaloquantError(f"allocation.solver: {solver} needs measured costs, but sensitivity.metric is "
                             "none; measure a metric (e.g. kl_calibrated) or use solver sac")


def _solve_sac(spec: AllocationSpec, table: SensitivityTable, embeddings: LayerEmbeddings | None,
               cands: Candidates, budget: int) -> list[str]:
    from haloquant.policy import AllocationProblem, SACAllocator

    if embeddings is None:
        raise HaloquantError("allocation.solver: sac needs the sensitivity stage's embeddings.json "
                             "(re-run the sensitivity stage)")
    problem = AllocationProblem.build(table, embeddings, cands)
    picks = SACAllocator(spec.policy).allocate(problem, 8 * budget / table.checkpoint_weights, budget)
    return [problem.formats[f] for f in picks]


def allocate_bits(spec: AllocationSpec, table: SensitivityTable,
                  embeddings: LayerEmbeddings | None = None) -> AllocationResult:
    require_costs(spec.solver, table.metric)
    cands = apply_rules(spec, table)
    min_bytes = smallest_bytes(cands)
    max_bytes = sum(max(c.bytes for c in cs.values()) for cs in cands)
    budget = budget_bytes(spec, table)
    min_bpw = 8 * min_bytes / table.checkpoint_weights
    if budget < min_bytes:
        field = spec.budget.field
        raise HaloquantError(
            f"allocation.budget.{field}: infeasible — the smallest allocation of formats "
            f"{table.formats}{' under allocation.rules' if spec.rules else ''} needs {min_bpw:.4f} bits per weight "
            f"({min_bytes + table.fixed_bytes} total bytes of tensor data"
            + (f", {min_bytes + table.fixed_bytes + table.gguf_overhead_bytes} as a GGUF file"
               if table.gguf_overhead_bytes else "")
            + "); raise the budget" + _smaller_formats_hint(table.formats)
        )
    cap = min(budget, max_bytes)
    onnx = onnx_sizes(table, cands)
    onnx_cap = None
    if spec.onnx_budget is not None:
        if spec.solver != "milp":
            raise HaloquantError(f"allocation.onnx_budget: only solver milp fits a second file's budget; got solver "
                                 f"{spec.solver}")
        onnx_cap = int(np.floor(spec.onnx_budget * budget))
    if spec.solver == "milp":
        picks = _solve_milp(cands, cap, spec.time_limit_s, None if onnx_cap is None else (onnx, onnx_cap))
    elif spec.solver == "sac":
        picks = _solve_sac(spec, table, embeddings, cands, cap)
    elif spec.solver == "lagrangian":
        picks = _solve_lagrangian(cands, cap)
    else:
        picks = _fill_greedy(cands, _cheapest(cands), cap)
    return _result(spec, table, cands, onnx, picks, budget, min_bpw, onnx_cap)


def _smaller_formats_hint(formats: list[str]) -> str:
    """The registered block formats below the candidates' smallest, for the infeasible-budget error."""
    floor = min(FORMATS[f].bits_per_weight for f in formats)
    smaller = [f"{f.name} ({f.bits_per_weight:.4g} bpw)" for f in FORMATS.values()
               if f.block_size > 1 and f.bits_per_weight < floor]
    return f" or add smaller formats to sensitivity.formats: {', '.join(smaller)}" if smaller else ""


def _result(spec: AllocationSpec, table: SensitivityTable, cands: Candidates, onnx: list[dict[str, int]],
            picks: list[str], budget: int, min_bpw: float, onnx_cap: int | None, **extra) -> AllocationResult:
    choices = []
    for t, cs, f, o in zip(table.tensors, cands, picks, onnx):
        c = cs[f]
        choices.append(TensorChoice(name=t.name, gguf_name=t.gguf_name, format=f, bytes=c.bytes,
                                    bits_per_weight=8 * c.bytes / t.n_weights, error=c.error, onnx_bytes=o[f]))
    used = sum(c.bytes for c in choices)
    assert used <= budget
    return AllocationResult(
        solver=spec.solver, budget_bytes=budget, budget_spec=spec.budget.model_dump(exclude_none=True),
        used_bytes=used, total_bytes=used + table.fixed_bytes, bits_per_weight=8 * used / table.checkpoint_weights,
        objective=sum(c.error for c in choices), min_feasible_bits_per_weight=min_bpw, tensors=choices,
        onnx_bytes=sum(c.onnx_bytes for c in choices), onnx_budget_bytes=onnx_cap, **extra,
    )


def refine_allocation(spec: AllocationSpec, table: SensitivityTable, result: AllocationResult, model_spec: ModelSpec,
                      quant_spec: QuantizeSpec, calib_dir: Path) -> AllocationResult:
    """allocation.refine: the solver's formats, improved by measured end-to-end KL (haloquant/refine.py)."""
    from haloquant.calibstats import CalibrationStats
    from haloquant.klprobe import KLProbe, first_block
    from haloquant.modelio import decoder_layers, load_model, quantizable_tensors
    from haloquant.quantizer import quantize_tensor
    from haloquant.refine import decoded_values, refine_formats
    from haloquant.streaming import compute_device, streamed

    model = load_model(model_spec.path, model_spec.device, model_spec.stream)
    if streamed(model):
        raise HaloquantError("allocation.refine.evaluations: the refinement needs the whole model on its device "
                             "(model.stream is on for this model); set it to 0 or model.stream to false")
    device = compute_device(model)
    stats = CalibrationStats(calib_dir, model=model, device=device)
    ids = stats.tensor("calibration_ids")
    ids = ids[max(0, len(ids) - spec.refine.sequences):]
    infos = {t.name: t for t in quantizable_tensors(model)}
    missing = [t.name for t in table.tensors if t.name not in infos]
    if missing:
        raise HaloquantError(f"sensitivity.json names tensors {missing[:3]} that {model_spec.path} does not have: it "
                             "was made for another model; re-run sensitivity")
    tensors = [infos[t.name] for t in table.tensors]
    params = dict(model.named_parameters(remove_duplicate=False))
    weights = {t.name: params[t.name].detach().clone() for t in tensors}
    probe = KLProbe(model, ids)
    n_layers = len(decoder_layers(model))
    value = decoded_values(tensors, weights, lambda t, w, fmt: quantize_tensor(t, w, fmt, quant_spec, stats, device),
                           device)
    cands = apply_rules(spec, table)
    onnx = onnx_sizes(table, cands)
    second = (onnx, result.onnx_budget_bytes) if result.onnx_budget_bytes is not None else None
    r = spec.refine
    found = refine_formats(probe, [t.name for t in tensors], [first_block(t, n_layers) for t in tensors], cands,
                           [c.format for c in result.tensors], result.budget_bytes, value, r.evaluations,
                           r.time_limit_s, r.min_z, second)
    report = {"kl_start": found.kl_start, "kl_end": found.kl_end, "evaluations": found.evaluations,
              "seconds": round(found.seconds, 1), "sequences": len(ids), "accepted": found.accepted}
    return _result(spec, table, cands, onnx, found.picks, result.budget_bytes, result.min_feasible_bits_per_weight,
                   result.onnx_budget_bytes, refinement=report)


def allocate(spec: AllocationSpec, sensitivity_dir: Path, out_dir: Path, model_spec: ModelSpec | None = None,
             quant_spec: QuantizeSpec | None = None, calib_dir: Path | None = None) -> AllocationResult:
    """`model_spec`, `quant_spec`, `calib_dir`: the model, its quantizer and calibration, for allocation.refine."""
    table = read_artifact(sensitivity_dir / "sensitivity.json", SensitivityTable)
    emb_file = sensitivity_dir / EMBEDDINGS_FILE
    embeddings = read_artifact(emb_file, LayerEmbeddings) if emb_file.is_file() else None
    result = allocate_bits(spec, table, embeddings)
    if spec.refine.evaluations:
        if model_spec is None or calib_dir is None:
            raise HaloquantError("allocation.refine needs the model and its calibration: not given to allocate here")
        result = refine_allocation(spec, table, result, model_spec, quant_spec or QuantizeSpec(), calib_dir)
    write_json(out_dir / ALLOCATION_FILE, result.model_dump())
    write_json(out_dir / PLOT_FILE, [
        {"index": i, "tensor": c.gguf_name, "bits_per_weight": round(c.bits_per_weight, 4), "format": c.format}
        for i, c in enumerate(result.tensors)
    ])
    return result
