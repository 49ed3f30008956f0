"""RAMP's learned allocator: a Soft Actor-Critic policy (stable-baselines3) that walks a model's
tensors in order and picks each one's bits from its 11-feature layer embedding and the budget
left, trained once and applied to other models zero-shot.

Environment (`AllocationEnv`, gymnasium): one episode = one model (drawn from the training models)
at one budget. Observation: the tensor's embedding (haloquant/embedding.py) + [target bits, bits
per remaining weight still affordable, progress, previous bits, the tensor's share of the weights
still to be allocated], bits normalised to the policy's format range. Action: one
number a in [-1, 1], read relative to the running budget: desired bits = (bits per remaining weight
still affordable) + a · (format range) / 2, clipped to the range → the supported format nearest.
So a = 0 spends evenly and the policy learns where to deviate (which tensors deserve more), the
budget bookkeeping being the environment's; RAMP's absolute bit action learned the budget far
more slowly in our trials (90 % of episodes over budget after 3000 steps).

Reward, quality first: each step costs the chosen format's sensitivity cost divided by the exact
(MILP) optimum's total cost at that budget, so an episode's quality term is −(cost / optimum),
comparable across budgets and models. The sensitivity cost is the validated proxy — `kl_calibrated`,
one measured KL per tensor scaling its output-error curve — rather than a forward pass per step:
the MILP allocations built on it beat llama.cpp's presets in llama.cpp's own perplexity (issue 4's
bench), and a perplexity evaluation per step would make training thousands of times slower.
At the episode's end: over budget costs a cliff of 10 plus 100 × the overshoot fraction; bits left
unused cost only 2 × the unused fraction (they also cost quality through the steps' costs).

Applying a policy (`SACAllocator`) needs no costs at all: embeddings and storage sizes. A repair
step then guarantees the budget: over → downgrade the tensors most above the policy's desired bits;
then, while anything fits, upgrade those most below it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np

from haloquant import HaloquantError
from haloquant.embedding import FEATURES

OBS_EXTRA = ("target_bits", "affordable_bits", "progress", "previous_bits", "remaining_share")
OVER_CLIFF, OVER_SLOPE, UNDER_SLOPE = 10.0, 100.0, 2.0


@dataclass
class AllocationProblem:
    """One model as the allocator sees it: per tensor its embedding and, per format, its size."""

    names: list[str]
    features: np.ndarray  # [T, 11]
    n_weights: np.ndarray  # [T]
    formats: list[str]
    bpw: np.ndarray  # [F] nominal bits per weight of each format
    nbytes: np.ndarray  # [T, F] storage bytes; inf where the format is not a candidate
    costs: np.ndarray | None = None  # [T, F] sensitivity costs (training only)
    optimum: dict[float, float] = field(default_factory=dict)  # budget (bpw) → MILP cost (training only)

    @property
    def total_weights(self) -> int:
        return int(self.n_weights.sum())

    @classmethod
    def build(cls, table, embeddings, cands: list[dict] | None = None) -> "AllocationProblem":
        """From a SensitivityTable and its LayerEmbeddings; `cands` = per-tensor candidates after
        allocation.rules (default: the table's)."""
        from haloquant.formats import get_format

        if [e.gguf_name for e in embeddings.tensors] != [t.gguf_name for t in table.tensors]:
            raise HaloquantError("sensitivity: embeddings.json and sensitivity.json list different tensors "
                                 "(re-run the sensitivity stage)")
        if embeddings.features != list(FEATURES):
            raise HaloquantError(f"sensitivity: embeddings.json has features {embeddings.features}, expected "
                                 f"{list(FEATURES)} (re-run the sensitivity stage)")
        cands = cands if cands is not None else [t.candidates for t in table.tensors]
        formats = sorted({f for c in cands for f in c}, key=lambda f: get_format(f).bits_per_weight)
        nbytes = np.full((len(cands), len(formats)), np.inf)
        costs = np.full((len(cands), len(formats)), np.inf)
        for t, c in enumerate(cands):
            for j, f in enumerate(formats):
                if f in c:
                    nbytes[t, j], costs[t, j] = c[f].bytes, c[f].error
        return cls(names=[t.gguf_name for t in table.tensors],
                   features=np.array([e.values for e in embeddings.tensors], dtype=np.float64),
                   n_weights=np.array([t.n_weights for t in table.tensors], dtype=np.float64),
                   formats=formats, bpw=np.array([get_format(f).bits_per_weight for f in formats]),
                   nbytes=nbytes, costs=None if table.metric == "none" else costs)


@dataclass(frozen=True)
class BitsScale:
    """The policy's fixed input/output scaling: bits normalised to its format range (lowest → 0,
    highest → 1), and features standardised by the training model's mean and std (kept in the
    policy card, so a new model is seen through the same lens)."""

    lo: float
    hi: float
    feature_mean: tuple[float, ...] | None = None
    feature_std: tuple[float, ...] | None = None

    def features(self, x: np.ndarray) -> np.ndarray:
        if self.feature_mean is None:
            return x
        return (x - np.asarray(self.feature_mean)) / np.asarray(self.feature_std)

    def norm(self, bits: float) -> float:
        return (bits - self.lo) / (self.hi - self.lo)

    def bits(self, action: float, affordable: float) -> float:
        """Desired bits: the affordable bits per weight, moved by the action (±half the range)."""
        a = float(np.clip(action, -1, 1))
        return float(np.clip(affordable + a * (self.hi - self.lo) / 2, self.lo, self.hi))


def affordable_bits(p: "AllocationProblem", t: int, used: float, budget: float) -> float:
    """Bits per weight the tensors from t on can have on average without exceeding the budget."""
    return 8 * (budget - used) / float(p.n_weights[t:].sum())


def observation(p: AllocationProblem, t: int, target_bpw: float, used: float, budget: float, prev_bits: float,
                scale: BitsScale) -> np.ndarray:
    affordable = affordable_bits(p, t, used, budget)
    # what one extra bit here costs the tensors still to come: the tied embedding is 17 % of
    # ref-llama-a but 40 % of ref-llama-tiny, and the embedding's param_share cannot tell them apart
    remaining_share = float(p.n_weights[t] / p.n_weights[t:].sum())
    extra = [scale.norm(target_bpw), float(np.clip(scale.norm(affordable), -2, 3)), t / len(p.names),
             scale.norm(prev_bits), remaining_share]
    return np.concatenate([scale.features(p.features[t]), extra]).astype(np.float32)


def nearest_format(p: AllocationProblem, t: int, bits: float) -> int:
    ok = np.isfinite(p.nbytes[t])
    dist = np.where(ok, np.abs(p.bpw - bits), np.inf)
    return int(np.argmin(dist))


class AllocationEnv(gym.Env):
    """Episodes over (problem, budget) pairs; budgets from a grid whose optima are precomputed."""

    def __init__(self, problems: list[AllocationProblem], budgets: list[float], scale: BitsScale, seed: int = 0):
        for p in problems:
            if p.costs is None or any(b not in p.optimum for b in budgets):
                raise ValueError("training problems need costs and the optimum at every training budget")
        self.problems, self.budgets, self.scale = problems, budgets, scale
        dim = len(FEATURES) + len(OBS_EXTRA)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (dim,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.reset(seed=seed)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        o = options or {}
        self.p = self.problems[o.get("problem", int(self.np_random.integers(len(self.problems))))]
        self.target = float(o.get("bits_per_weight", self.budgets[int(self.np_random.integers(len(self.budgets)))]))
        self.budget = np.floor(self.target * self.p.total_weights / 8)
        self.ref = self.p.optimum[self.target]
        self.t, self.used, self.prev, self.quality = 0, 0.0, self.target, 0.0
        return self._obs(), {}

    def _obs(self) -> np.ndarray:
        t = min(self.t, len(self.p.names) - 1)
        return observation(self.p, t, self.target, self.used, self.budget, self.prev, self.scale)

    def step(self, action):
        bits = self.scale.bits(float(np.asarray(action).ravel()[0]),
                               affordable_bits(self.p, self.t, self.used, self.budget))
        f = nearest_format(self.p, self.t, bits)
        reward = -self.p.costs[self.t, f] / self.ref
        self.quality += reward
        self.used += self.p.nbytes[self.t, f]
        self.prev = float(self.p.bpw[f])
        self.t += 1
        done = self.t == len(self.p.names)
        info = {}
        if done:
            over = self.used / self.budget - 1
            reward -= OVER_CLIFF + OVER_SLOPE * over if over > 0 else UNDER_SLOPE * -over
            info = {"quality": self.quality, "over": over}
        return self._obs(), float(reward), done, False, info


def repair(p: AllocationProblem, picks: list[int], desired: list[float], budget: float) -> list[int]:
    """Make the allocation fit `budget` bytes, then spend what is left, guided by the desired bits."""
    picks = list(picks)
    sizes = [np.flatnonzero(np.isfinite(p.nbytes[t]))[np.argsort(p.nbytes[t][np.isfinite(p.nbytes[t])])]
             for t in range(len(picks))]  # each tensor's candidate formats, smallest first

    total = float(sum(p.nbytes[t, f] for t, f in enumerate(picks)))
    while total > budget:
        movable = [t for t in range(len(picks)) if list(sizes[t]).index(picks[t]) > 0]
        if not movable:
            raise HaloquantError("allocation: the budget is below the smallest formats (cannot repair)")
        t = max(movable, key=lambda t: p.bpw[picks[t]] - desired[t])
        smaller = sizes[t][list(sizes[t]).index(picks[t]) - 1]
        total += p.nbytes[t, smaller] - p.nbytes[t, picks[t]]
        picks[t] = int(smaller)
    while True:
        ups = []
        for t in range(len(picks)):
            i = list(sizes[t]).index(picks[t])
            if i + 1 < len(sizes[t]) and total + p.nbytes[t, sizes[t][i + 1]] - p.nbytes[t, picks[t]] <= budget:
                ups.append(t)
        if not ups:
            return picks
        t = max(ups, key=lambda t: desired[t] - p.bpw[picks[t]])
        bigger = sizes[t][list(sizes[t]).index(picks[t]) + 1]
        total += p.nbytes[t, bigger] - p.nbytes[t, picks[t]]
        picks[t] = int(bigger)


def rollout(predict, p: AllocationProblem, target_bpw: float, budget: float, scale: BitsScale) -> list[int]:
    """The policy's allocation of `p` within `budget` bytes (repaired)."""
    picks, desired, used, prev = [], [], 0.0, target_bpw
    for t in range(len(p.names)):
        bits = scale.bits(predict(observation(p, t, target_bpw, used, budget, prev, scale)),
                          affordable_bits(p, t, used, budget))
        f = nearest_format(p, t, bits)
        picks.append(f)
        desired.append(bits)
        used += p.nbytes[t, f]
        prev = float(p.bpw[f])
    return repair(p, picks, desired, budget)


def _sb3_predict(model):
    return lambda obs: float(model.predict(obs, deterministic=True)[0][0])


def proxy_regret(p: AllocationProblem, picks: list[int], target_bpw: float) -> float:
    """cost(picks) / optimum − 1 on the sensitivity proxy (0 = as good as the exact MILP)."""
    return float(sum(p.costs[t, f] for t, f in enumerate(picks))) / p.optimum[target_bpw] - 1


def train_sac(problems: list[AllocationProblem], budgets: list[float], scale: BitsScale, timesteps: int, seed: int,
              net_arch: list[int], eval_every: int, out_dir: Path, learning_rate: float = 3e-4,
              batch_size: int = 256, gradient_steps: int = 1, gamma: float = 0.99) -> dict:
    """Train SAC on the problems; writes policy.zip, returns the learning curve and training cost."""
    import torch
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.logger import Logger

    env = AllocationEnv(problems, budgets, scale, seed)
    eval_budgets = sorted({budgets[0], budgets[len(budgets) // 2], budgets[-1]})
    curve: list[dict] = []
    episodes: list[dict] = []

    class Curve(BaseCallback):
        def _on_step(self) -> bool:
            for info, done in zip(self.locals["infos"], self.locals["dones"]):
                if done:
                    episodes.append(info)
            if self.num_timesteps % eval_every == 0 or self.num_timesteps == timesteps:
                row = {"step": self.num_timesteps, "episodes": len(episodes)}
                recent = episodes[-50:]
                row["episode_quality"] = float(np.mean([e["quality"] for e in recent])) if recent else None
                row["episode_over_budget"] = float(np.mean([e["over"] > 0 for e in recent])) if recent else None
                pred = _sb3_predict(self.model)
                regrets = [proxy_regret(p, rollout(pred, p, b, np.floor(b * p.total_weights / 8), scale), b)
                           for p in problems for b in eval_budgets]
                row["proxy_regret"] = float(np.mean(regrets))
                curve.append(row)
            return True

    # The thread count is process-wide and changes float reductions: it is restored, or every later
    # stage in this process (a Prefect flow runs them all in one) would compute other bytes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small networks: threads cost more than they give
    try:
        model = SAC("MlpPolicy", env, seed=seed, policy_kwargs={"net_arch": list(net_arch)}, learning_starts=1000,
                    learning_rate=learning_rate, batch_size=batch_size, gradient_steps=gradient_steps, gamma=gamma,
                    device="cpu", verbose=0)
        model.set_logger(Logger(folder=None, output_formats=[]))  # SB3's default leaves a /tmp/SB3-<time> folder
        t0 = time.perf_counter()
        model.learn(total_timesteps=timesteps, callback=Curve())
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "policy.tmp.zip"
    model.save(tmp, exclude=["ep_info_buffer", "ep_success_buffer"])  # episode wall times: not the policy
    _reproducible_zip(tmp)
    tmp.replace(out_dir / "policy.zip")
    return {"seconds": seconds, "episodes": len(episodes), "curve": curve, "eval_budgets": eval_budgets}


def _without_volatile(node):
    """stable-baselines3's saved `data`: objects are their `:serialized:` bytes; the readable reprs
    beside them hold memory addresses, and `start_time` the clock."""
    if isinstance(node, dict):
        if ":serialized:" in node:
            return {k: node[k] for k in (":type:", ":serialized:") if k in node}
        return {k: (0 if k == "start_time" else _without_volatile(v)) for k, v in node.items()}
    return node


def _reproducible_zip(path: Path) -> None:
    """Rewrite a stable-baselines3 zip so that equal policies give equal bytes: volatile fields of
    `data` removed, the host's system_info.txt left out (optional on load), fixed entry times."""
    import json
    import zipfile

    with zipfile.ZipFile(path) as z:
        entries = [(n, z.read(n)) for n in z.namelist() if n != "system_info.txt"]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries:
            if name == "data":
                data = json.dumps(_without_volatile(json.loads(data)), indent=4).encode()
            z.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data, zipfile.ZIP_DEFLATED)


def check_policy_folder(policy_dir: Path) -> dict:
    """A train_policy output made for this haloquant's features; returns its card."""
    policy_dir = Path(policy_dir)
    card_file = policy_dir / "policy.json"
    if not card_file.is_file() or not (policy_dir / "policy.zip").is_file():
        raise HaloquantError(f"allocation.policy: {str(policy_dir)!r} is not a train_policy output "
                             "(expected policy.zip and policy.json in it)")
    try:
        card = json.loads(card_file.read_text())
    except json.JSONDecodeError as e:
        raise HaloquantError(f"allocation.policy: {card_file} is not valid JSON ({e})") from None
    if card.get("features") != list(FEATURES) or card.get("obs_extra") != list(OBS_EXTRA):
        raise HaloquantError(f"allocation.policy: {str(policy_dir)!r} was trained on other features "
                             f"({card.get('features')}, {card.get('obs_extra')}); expected {list(FEATURES)}, "
                             f"{list(OBS_EXTRA)}: retrain it with this haloquant (train_policy)")
    return card


class SACAllocator:
    """A trained policy folder (policy.zip + policy.json), applied to any model."""

    def __init__(self, policy_dir: Path):
        policy_dir = Path(policy_dir)
        self.card = check_policy_folder(policy_dir)
        from stable_baselines3 import SAC

        self.model = SAC.load(policy_dir / "policy.zip", device="cpu")
        self.scale = BitsScale(*self.card["bits_range"], tuple(self.card["feature_mean"]),
                               tuple(self.card["feature_std"]))

    def allocate(self, p: AllocationProblem, target_bpw: float, budget: float) -> list[int]:
        return rollout(_sb3_predict(self.model), p, target_bpw, budget, self.scale)
