"""allocation.refine: the solver's formats improved by the whole model's measured KL (haloquant/refine.py),
on the shipped ref-llama-tiny with its real weights and WikiText calibration."""

from __future__ import annotations

import pytest
import torch

from haloquant import HaloquantError
from haloquant.artifacts import read_artifact
from haloquant.calibstats import CalibrationStats
from haloquant.formats import get_format
from haloquant.klprobe import KLProbe, first_block
from haloquant.modelio import decoder_layers, load_model, quantizable_tensors
from haloquant.quantizer import quantize_tensor
from haloquant.refine import candidate_moves, decoded_values, refine_formats
from haloquant.schemas.artifacts import AllocationResult, SensitivityTable
from haloquant.schemas.params import AllocationSpec, ModelSpec, QuantizeSpec, SensitivitySpec
from haloquant.tasks.allocate import allocate, apply_rules
from haloquant.tasks.sensitivity import score_sensitivity
from tests.conftest import calibrate_tiny, TINY

SPEC = ModelSpec(path=TINY, device="cpu", add_bos=True)
FORMATS = ["Q2_K", "Q3_K", "Q4_K", "Q6_K"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("refine")
    calibrate_tiny(root / "calibrate", 8, 64)
    score_sensitivity(SPEC, SensitivitySpec(formats=FORMATS, metric="output_error"), QuantizeSpec(),
                      root / "calibrate", root / "sensitivity")
    return root


@pytest.fixture(scope="module")
def model_and_probe(run):
    model = load_model(TINY, "cpu")
    stats = CalibrationStats(run / "calibrate", model=model, device=torch.device("cpu"))
    probe = KLProbe(model, stats.tensor("calibration_ids")[-4:])
    return model, stats, probe


def test_trials_replay_exactly_and_undo(model_and_probe):
    """A trial replays the blocks before its first changed one from the last kept run: its KL equals a
    full forward pass of the same weights; a rejected trial leaves every weight as it was."""
    model, _, probe = model_and_probe
    params = dict(model.named_parameters())
    infos = quantizable_tensors(model)
    n = len(decoder_layers(model))
    early = next(t for t in infos if t.layer == 0 and t.kind != "token_embd")
    late = next(t for t in infos if t.layer == n - 1)
    noisy = {t.name: params[t.name].detach() * 1.02 for t in (early, late)}
    before = {k: v.detach().clone() for k, v in params.items()}

    kl_early = probe.trial({early.name: noisy[early.name]}, first_block(early, n))
    probe.accept()
    kl_both = probe.trial({late.name: noisy[late.name]}, first_block(late, n))  # blocks < late replayed
    probe.reject()
    assert torch.equal(params[late.name], before[late.name]) and not torch.equal(params[early.name], before[early.name])
    full = probe.trial({early.name: noisy[early.name], late.name: noisy[late.name]}, 0)  # nothing replayed
    assert kl_both == pytest.approx(full, rel=1e-5)
    assert kl_early > 0 and kl_both != pytest.approx(kl_early)
    probe.reject()
    probe.trial({early.name: before[early.name]}, 0)  # back to the float model
    probe.accept()
    assert all(torch.equal(params[k], before[k]) for k in params)
    assert probe.trial({}, 0) == pytest.approx(0.0, abs=1e-7)
    probe.reject()


def test_candidate_moves_fit_the_budget_and_come_cheapest_first():
    from haloquant.schemas.artifacts import FormatCost

    cands = [{"A": FormatCost(bytes=10, error=5.0), "B": FormatCost(bytes=20, error=2.0)},
             {"A": FormatCost(bytes=10, error=4.0), "B": FormatCost(bytes=20, error=3.5)},
             {"A": FormatCost(bytes=30, error=1.0), "B": FormatCost(bytes=40, error=0.5)}]
    order = [["A", "B"]] * 3
    cost = [{f: c.error for f, c in cs.items()} for cs in cands]
    size = [{f: c.bytes for f, c in cs.items()} for cs in cands]
    moves = candidate_moves(["A", "B", "B"], order, cost, size, slack=0, second=None, tried=set())
    # nothing fits alone; every pair frees at least what it takes
    assert {m.changes for m in moves} == {((0, "B"), (1, "A")), ((0, "B"), (2, "A"))}
    assert [m.proxy for m in moves] == [-3.0 + 0.5, -3.0 + 0.5]
    assert all(m.extra_bytes <= 0 for m in moves)
    assert candidate_moves(["A", "B", "B"], order, cost, size, 0, None, {moves[0].changes})[0].changes != moves[0].changes


def test_refinement_keeps_the_budget_and_lowers_the_measured_kl(run, model_and_probe):
    """From a deliberately poor start (the embedding and first block at the lowest bits), the search moves bytes
    to where the measured KL drops, never past the budget; the KL it reports for its answer is the answer's KL
    measured afresh."""
    model, stats, probe = model_and_probe
    table = read_artifact(run / "sensitivity" / "sensitivity.json", SensitivityTable)
    infos = {t.name: t for t in quantizable_tensors(model)}
    tensors = [infos[t.name] for t in table.tensors]
    cands = apply_rules(AllocationSpec(budget={"bits_per_weight": 4.0}), table)
    params = dict(model.named_parameters(remove_duplicate=False))
    weights = {t.name: params[t.name].detach().clone() for t in tensors}
    value = decoded_values(tensors, weights, lambda t, w, f: quantize_tensor(t, w, f, QuantizeSpec(), stats, "cpu"),
                           "cpu")
    # start: the embedding and block 0 at Q2_K, the rest at Q4_K, at whatever that costs
    picks = ["Q2_K" if t.kind in ("token_embd", "output") or t.layer == 0 else "Q4_K" for t in tensors]
    budget = sum(cands[i][f].bytes for i, f in enumerate(picks))
    n = len(decoder_layers(model))
    found = refine_formats(probe, [t.name for t in tensors], [first_block(t, n) for t in tensors], cands, picks,
                           budget, value, evaluations=40, time_limit_s=300, min_z=0.0)
    assert sum(cands[i][f].bytes for i, f in enumerate(found.picks)) <= budget
    assert found.evaluations <= 40 and found.accepted
    assert found.kl_end < found.kl_start
    assert [a["kl"] for a in found.accepted] == sorted((a["kl"] for a in found.accepted), reverse=True)
    fresh = probe.trial({t.name: value(i, found.picks[i]) for i, t in enumerate(tensors)}, 0)
    probe.reject()
    assert fresh == pytest.approx(found.kl_end, rel=1e-5)
    for a in found.accepted:
        assert a["z"] >= 0.0 and a["kl"] < a["kl_before"]
    # a move must beat the noise between sequences: with an impossible bar nothing is kept
    strict = refine_formats(probe, [t.name for t in tensors], [first_block(t, n) for t in tensors], cands, picks,
                            budget, value, evaluations=10, time_limit_s=300, min_z=1e9)
    assert strict.picks == picks and not strict.accepted and strict.evaluations == 10
    assert strict.kl_end == strict.kl_start == pytest.approx(found.kl_start, rel=1e-6)
    probe.trial({t.name: weights[t.name] for t in tensors}, 0)  # leave the shared model float for other tests
    probe.accept()


def test_the_allocate_stage_refines_within_budget_and_is_off_by_default(run, tmp_path):
    plain = allocate(AllocationSpec(budget={"bits_per_weight": 3.5}), run / "sensitivity", tmp_path / "plain")
    assert plain.refinement is None
    spec = AllocationSpec(budget={"bits_per_weight": 3.5}, refine={"evaluations": 12, "sequences": 4})
    refined = allocate(spec, run / "sensitivity", tmp_path / "refined", SPEC, QuantizeSpec(), run / "calibrate")
    stored = read_artifact(tmp_path / "refined" / "allocation.json", AllocationResult)
    assert stored == refined
    assert refined.used_bytes <= refined.budget_bytes == plain.budget_bytes
    assert refined.refinement["evaluations"] <= 12 and refined.refinement["sequences"] == 4
    assert refined.refinement["kl_end"] <= refined.refinement["kl_start"]
    changed = {c.name for a, b in zip(plain.tensors, refined.tensors) if a.format != b.format for c in (a,)}
    kept = {ch["tensor"] for m in refined.refinement["accepted"] for ch in m["changes"]}
    assert changed <= kept
    assert all(get_format(c.format).name in FORMATS for c in refined.tensors)
    with pytest.raises(HaloquantError, match="allocation.refine"):
        allocate(spec, run / "sensitivity", tmp_path / "no-model")
