"""RAMP's learned allocator: layer embeddings, the gymnasium environment, SAC training, and the
`sac` solver applied to models it was not trained on — always within budget."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from haloquant import HaloquantError
from haloquant.artifacts import read_json
from haloquant.embedding import FEATURES
from haloquant.policy import (OBS_EXTRA, AllocationEnv, AllocationProblem, BitsScale, SACAllocator, observation,
                              repair, rollout)
from haloquant.schemas.artifacts import LayerEmbeddings, SensitivityTable
from haloquant.schemas.params import AllocationSpec, QuantizeSpec, SensitivitySpec, TrainPolicySpec
from haloquant.tasks.allocate import allocate
from haloquant.tasks.calibrate import calibrate
from haloquant.tasks.sensitivity import score_sensitivity
from haloquant.tasks.train_policy import train_policy, training_problem

from tests.conftest import CALIB_TEXT, REPO, TINY

KQ = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]
SHIPPED = REPO / "policies" / "sac-llama-family"


@pytest.fixture(scope="module")
def tiny_tables(tmp_path_factory):
    """Calibration, a measured (kl_calibrated) and an unmeasured (none) sensitivity table of the tiny model."""
    from haloquant.schemas.params import CalibrationSpec, ModelSpec

    root = tmp_path_factory.mktemp("policy")
    spec = ModelSpec(path=TINY, device="cpu", add_bos=True)  # the reference models start with BOS
    calibrate(spec, CalibrationSpec(text=CALIB_TEXT, n_sequences=8, seq_len=128), root / "calibrate")
    for metric in ("kl_calibrated", "none"):
        score_sensitivity(spec, SensitivitySpec(formats=KQ, metric=metric, kl_sequences=2), QuantizeSpec(),
                          root / "calibrate", root / metric)
    return root


def _load(d):
    return (SensitivityTable.model_validate(read_json(d / "sensitivity.json")),
            LayerEmbeddings.model_validate(read_json(d / "embeddings.json")))


def test_embeddings_are_finite_and_structural_features_exact(tiny_tables):
    table, emb = _load(tiny_tables / "kl_calibrated")
    assert emb.features == list(FEATURES) and len(FEATURES) == 11
    vals = np.array([e.values for e in emb.tensors])
    assert vals.shape == (len(table.tensors), 11) and np.isfinite(vals).all()
    by_name = {e.gguf_name: dict(zip(FEATURES, e.values)) for e in emb.tensors}
    # ref-llama-tiny: 4 blocks, hidden 256, FFN 768
    assert by_name["blk.0.attn_q.weight"]["depth"] == 0 and by_name["blk.3.ffn_down.weight"]["depth"] == 1
    assert by_name["blk.2.ffn_down.weight"]["fan_in_ratio"] == pytest.approx(math.log2(768 / 256))
    assert by_name["blk.2.attn_k.weight"]["kind"] == pytest.approx(1 / 7)
    # the Hessian proxy is relative to the model's median tensor
    assert np.median(vals[:, FEATURES.index("hessian_proxy")]) == pytest.approx(0, abs=1e-9)
    # the unmeasured table carries the same embedding and true sizes, no costs
    none_table, none_emb = _load(tiny_tables / "none")
    assert [e.values for e in none_emb.tensors] == [e.values for e in emb.tensors]
    assert all(c.error == 0 for t in none_table.tensors for c in t.candidates.values())
    assert [{f: c.bytes for f, c in t.candidates.items()} for t in none_table.tensors] == \
           [{f: c.bytes for f, c in t.candidates.items()} for t in table.tensors]


def _random_problem(rng, n=20) -> AllocationProblem:
    formats = KQ
    from haloquant.formats import get_format

    bpw = np.array([get_format(f).bits_per_weight for f in formats])
    n_w = rng.integers(1, 5, n) * 65536.0
    nbytes = n_w[:, None] * bpw[None, :] / 8
    nbytes[rng.random((n, len(formats))) < 0.15] = np.inf  # some formats not candidates
    nbytes[:, 0] = n_w * bpw[0] / 8  # the smallest always is
    costs = rng.random(n)[:, None] * 2.0 ** (-2 * bpw[None, :])
    return AllocationProblem(names=[f"t{i}" for i in range(n)], features=rng.normal(size=(n, 11)), n_weights=n_w,
                             formats=formats, bpw=bpw, nbytes=nbytes, costs=costs)


@pytest.mark.parametrize("desire", [2.0, 4.0, 9.0])
def test_repair_fits_the_budget_and_spends_it(desire):
    rng = np.random.default_rng(0)
    p = _random_problem(rng)
    for bpw_budget in (3.0, 4.25, 6.0):
        budget = np.floor(bpw_budget * p.total_weights / 8)
        start = [int(np.flatnonzero(np.isfinite(p.nbytes[t]))[-1]) for t in range(len(p.names))]  # all max
        picks = repair(p, start, [desire] * len(start), budget)
        used = sum(p.nbytes[t, f] for t, f in enumerate(picks))
        assert used <= budget and all(np.isfinite(p.nbytes[t, f]) for t, f in enumerate(picks))
        # nothing left could be upgraded within the budget
        for t, f in enumerate(picks):
            bigger = [g for g in range(len(p.formats)) if np.isfinite(p.nbytes[t, g]) and p.nbytes[t, g] > p.nbytes[t, f]]
            assert all(used - p.nbytes[t, f] + p.nbytes[t, g] > budget for g in bigger)


def test_observation_shows_each_tensors_share_of_the_weights_left():
    """What an extra bit costs the rest differs by model (a tied embedding is 17 % of ref-llama-a,
    40 % of ref-llama-tiny): the observation carries the tensor's share of the weights still to come."""
    p = _random_problem(np.random.default_rng(1), n=6)
    scale = BitsScale(2.625, 8.5)
    share = [observation(p, t, 4.0, 0.0, 1e9, 4.0, scale)[11 + OBS_EXTRA.index("remaining_share")]
             for t in range(6)]
    assert share == pytest.approx([p.n_weights[t] / p.n_weights[t:].sum() for t in range(6)], rel=1e-6)
    assert share[-1] == pytest.approx(1.0)


def test_environment_draws_episodes_from_every_training_model():
    rng = np.random.default_rng(2)
    problems = [_random_problem(rng, n) for n in (5, 9, 13)]
    for p in problems:
        p.optimum[4.0] = float(p.costs.min(1).sum())
    env = AllocationEnv(problems, [4.0], BitsScale(2.625, 8.5), seed=0)
    lengths = set()
    for _ in range(40):
        env.reset()
        done, n = False, 0
        while not done:
            _, _, done, _, _ = env.step(np.zeros(1, dtype=np.float32))
            n += 1
        lengths.add(n)
    assert lengths == {5, 9, 13}


def test_environment_penalises_overspending_with_a_cliff(tiny_tables):
    from stable_baselines3.common.env_checker import check_env

    table, emb = _load(tiny_tables / "kl_calibrated")
    problem = training_problem(table, emb, [4.0])
    scale = BitsScale(float(problem.bpw.min()), float(problem.bpw.max()))
    env = AllocationEnv([problem], [4.0], scale)
    check_env(env, warn=True)

    def episode(action):
        env.reset(options={"bits_per_weight": 4.0})
        total, done, info = 0.0, False, {}
        while not done:
            _, r, done, _, info = env.step(np.array([action], dtype=np.float32))
            total += r
        return total, info

    greedy, info_hi = episode(1.0)  # always the most bits: over budget
    frugal, info_lo = episode(-1.0)  # always the fewest: far under
    assert info_hi["over"] > 0 and info_lo["over"] < 0
    assert greedy - info_hi["quality"] <= -10  # the cliff
    assert -2 <= frugal - info_lo["quality"] < 0  # unused bits cost little beyond their quality
    assert info_hi["quality"] > info_lo["quality"]  # more bits, better quality term
    # the quality term is relative to the exact optimum: no allocation beats it within budget
    assert info_lo["quality"] <= -1


def test_train_policy_writes_a_policy_that_allocates_within_budget(tiny_tables, tmp_path):
    card = train_policy(TrainPolicySpec(timesteps=1200, eval_every=600, net_arch=[32, 32], budget_range=(3.0, 5.0)),
                        [tiny_tables / "kl_calibrated"], [tiny_tables / "calibrate"], tmp_path / "pol")
    assert (tmp_path / "pol" / "policy.zip").is_file()
    assert card.features == list(FEATURES) and card.timesteps == 1200 and card.episodes >= 1200 // 29 - 1
    curve = json.loads((tmp_path / "pol" / "learning_curve.json").read_text())
    assert [r["step"] for r in curve] == [600, 1200] and all(r["proxy_regret"] >= -1e-9 for r in curve)
    table, emb = _load(tiny_tables / "kl_calibrated")
    problem = AllocationProblem.build(table, emb)
    alloc = SACAllocator(tmp_path / "pol")
    for bpw in (3.2, 4.5, 5.9):
        budget = np.floor(bpw * problem.total_weights / 8)
        picks = alloc.allocate(problem, bpw, budget)
        assert sum(problem.nbytes[t, f] for t, f in enumerate(picks)) <= budget
        assert picks == alloc.allocate(problem, bpw, budget)  # deterministic


def test_the_same_training_writes_the_same_policy_bytes(tiny_tables, tmp_path):
    """policy.zip is an artifact like the others: no clock, memory address or host inside."""
    spec = TrainPolicySpec(timesteps=1100, eval_every=1100, net_arch=[16], budget_range=(3.0, 5.0))
    for run in ("a", "b"):
        train_policy(spec, [tiny_tables / "kl_calibrated"], [tiny_tables / "calibrate"], tmp_path / run)
    assert (tmp_path / "a" / "policy.zip").read_bytes() == (tmp_path / "b" / "policy.zip").read_bytes()


def test_training_leaves_the_process_thread_count_as_it_was(tiny_tables, tmp_path):
    """Training runs on one thread, but the count is process-wide and changes float sums: the stages
    run after it in the same process (a Prefect flow) must compute what they would have alone."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2 if before != 2 else 3)
    try:
        expected = torch.get_num_threads()
        train_policy(TrainPolicySpec(timesteps=1100, eval_every=1100, net_arch=[16], budget_range=(3.0, 5.0)),
                     [tiny_tables / "kl_calibrated"], [tiny_tables / "calibrate"], tmp_path / "pol")
        assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(before)


def test_sac_solver_on_an_unmeasured_model(tiny_tables, tmp_path):
    """The shipped policy (trained on ref-llama-a and four made models) applied zero-shot to
    ref-llama-tiny, which it never saw, from the `none` table: in budget, and it differs from
    uniform (it does allocate)."""
    for bpw in (3.5, 4.5):
        res = allocate(AllocationSpec(budget={"bits_per_weight": bpw}, solver="sac", policy=SHIPPED),
                       tiny_tables / "none", tmp_path / f"a{bpw}")
        assert res.used_bytes <= res.budget_bytes and res.solver == "sac"
        assert res.bits_per_weight > bpw - 0.5  # the fill step spends the budget
        assert len({c.format for c in res.tensors}) > 1


def test_solver_and_policy_errors_name_the_field(tiny_tables, tmp_path):
    with pytest.raises(HaloquantError, match="allocation.solver: milp needs measured costs"):
        allocate(AllocationSpec(budget={"bits_per_weight": 4.0}), tiny_tables / "none", tmp_path / "x")
    with pytest.raises(HaloquantError, match="allocation.policy"):
        allocate(AllocationSpec(budget={"bits_per_weight": 4.0}, solver="sac", policy=tmp_path / "nope"),
                 tiny_tables / "none", tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_rollout_respects_allocation_rules(tiny_tables):
    """Rules remove candidates; the policy only ever picks what is left."""
    table, emb = _load(tiny_tables / "none")
    cands = [({"Q6_K": t.candidates["Q6_K"]} if t.kind == "token_embd" else dict(t.candidates)) for t in table.tensors]
    p = AllocationProblem.build(table, emb, cands)
    budget = np.floor(5.0 * p.total_weights / 8)
    picks = rollout(lambda obs: -1.0, p, 5.0, budget, BitsScale(2.625, 8.5))
    assert p.formats[picks[0]] == "Q6_K" and sum(p.nbytes[t, f] for t, f in enumerate(picks)) <= budget


def test_train_policy_also_on_other_runs(tiny_tables, tmp_path):
    """`train_policy.also_on` adds other runs' measured tables to the training set; their contents
    are part of the stage's cache key; a folder that is not a run is refused by name."""
    import shutil

    from haloquant.tasks.runner import fingerprint
    from haloquant.schemas.params import parse_params
    from haloquant.tasks import TRAIN_POLICY

    from tests.conftest import small_params

    for name in ("this", "other"):
        shutil.copytree(tiny_tables / "calibrate", tmp_path / name / "calibrate")
        shutil.copytree(tiny_tables / "kl_calibrated", tmp_path / name / "sensitivity")
    spec = {"timesteps": 600, "eval_every": 600, "net_arch": [16], "budget_range": [3.0, 4.0]}
    params = parse_params(small_params(train_policy={**spec, "also_on": ["../other"]}), base_dir=tmp_path / "this")
    assert params.train_policy.also_on == [tmp_path / "this" / ".." / "other"]
    card = TRAIN_POLICY.run(params, tmp_path / "this")
    assert len(card.trained_on) == 2 and card.episodes >= 600 // 29 - 1

    key = fingerprint(TRAIN_POLICY, params, tmp_path / "this")
    emb = tmp_path / "other" / "sensitivity" / "embeddings.json"
    emb.write_text(emb.read_text().replace('"features"', '"features" ', 1))
    assert fingerprint(TRAIN_POLICY, params, tmp_path / "this") != key

    bad = parse_params(small_params(train_policy={**spec, "also_on": ["../nowhere"]}), base_dir=tmp_path / "this")
    with pytest.raises(HaloquantError, match=r"train_policy.also_on\[0\]: .*nowhere.* is not a pipeline run"):
        TRAIN_POLICY.run(bad, tmp_path / "x")
    assert not (tmp_path / "x").exists()
