"""train_policy: RAMP's Soft Actor-Critic allocator, trained on this pipeline's sensitivity table
(reward: the measured costs, normalised by the exact MILP optimum at each training budget) and
layer embeddings (the policy's only view of a model). Output: a policy folder that
`allocation.solver: sac` applies to any model — `allocation.policy: artifacts/train_policy`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from haloquant import HaloquantError
from haloquant.artifacts import read_artifact, write_json
from haloquant.embedding import FEATURES
from haloquant.policy import OBS_EXTRA, AllocationProblem, BitsScale, train_sac
from haloquant.schemas.artifacts import CalibrationReport, LayerEmbeddings, PolicyCard, SensitivityTable
from haloquant.schemas.params import AllocationSpec, TrainPolicySpec
from haloquant.tasks.allocate import allocate_bits

CARD_FILE = "policy.json"
CURVE_FILE = "learning_curve.json"


def training_problem(table: SensitivityTable, embeddings: LayerEmbeddings, budgets: list[float]) -> AllocationProblem:
    """The problem with its MILP optimum at every budget (the reward's normaliser)."""
    if table.metric == "none":
        raise HaloquantError("train_policy: sensitivity.metric is none; training needs measured costs "
                             "(kl_calibrated recommended)")
    p = AllocationProblem.build(table, embeddings)
    for b in budgets:
        p.optimum[b] = allocate_bits(AllocationSpec(budget={"bits_per_weight": b}), table).objective
    return p


def check_other_runs(also_on: list[Path]) -> None:
    """Each `train_policy.also_on` entry must be a run's artifacts folder with a measured table."""
    for i, root in enumerate(also_on):
        missing = [str(root / f) for f in ("sensitivity/sensitivity.json", "sensitivity/embeddings.json",
                                           "calibrate/calibration.json") if not (root / f).is_file()]
        if missing:
            raise HaloquantError(f"train_policy.also_on[{i}]: {str(root)!r} is not a pipeline run's artifacts "
                                 f"folder (missing {', '.join(missing)}; run its calibrate and sensitivity stages)")


def train_policy(spec: TrainPolicySpec, sensitivity_dirs: list[Path], calib_dirs: list[Path],
                 out_dir: Path) -> PolicyCard:
    import stable_baselines3

    tables = [read_artifact(d / "sensitivity.json", SensitivityTable) for d in sensitivity_dirs]
    embs = [read_artifact(d / "embeddings.json", LayerEmbeddings) for d in sensitivity_dirs]
    lo, hi = spec.budget_range
    # a grid of budgets, each above every training model's smallest feasible allocation
    floor_bpw = max(8 * sum(min(c.bytes for c in x.candidates.values()) for x in t.tensors)
                    / sum(x.n_weights for x in t.tensors) for t in tables)
    budgets = [float(b) for b in np.round(np.arange(lo, hi + 1e-9, 0.25), 4) if b > floor_bpw]
    if not budgets:
        raise HaloquantError(f"train_policy.budget_range: no budget above the smallest feasible {floor_bpw:.3f} bpw")
    problems = [training_problem(t, e, budgets) for t, e in zip(tables, embs)]
    feats = np.concatenate([p.features for p in problems])
    scale = BitsScale(float(min(p.bpw.min() for p in problems)), float(max(p.bpw.max() for p in problems)),
                      tuple(feats.mean(0).tolist()), tuple(np.maximum(feats.std(0), 1e-3).tolist()))
    res = train_sac(problems, budgets, scale, spec.timesteps, spec.seed, spec.net_arch, spec.eval_every, out_dir,
                    learning_rate=spec.learning_rate)
    trained_on = [{"model": read_artifact(c / "calibration.json", CalibrationReport).model,
                   "metric": t.metric, "tensors": len(t.tensors)} for c, t in zip(calib_dirs, tables)]
    card = PolicyCard(
        algorithm=f"SAC (stable-baselines3 {stable_baselines3.__version__})", features=list(FEATURES),
        obs_extra=list(OBS_EXTRA), bits_range=(scale.lo, scale.hi), feature_mean=list(scale.feature_mean),
        feature_std=list(scale.feature_std), formats=problems[0].formats,
        trained_on=trained_on, budgets=budgets, timesteps=spec.timesteps, seed=spec.seed,
        net_arch=spec.net_arch, episodes=res["episodes"], reward_evaluations=spec.timesteps,
        final_proxy_regret=res["curve"][-1]["proxy_regret"])
    write_json(out_dir / CURVE_FILE, res["curve"])
    write_json(out_dir / CARD_FILE, card.model_dump())
    return card
