"""Issue 6's hyper-parameter check: does any reasonable change to SAC's reward, discount, action
or network close the gap to MILP? Trains each variant for a fixed wall time on the training
models' tables and prints its proxy regret (cost / MILP optimum − 1) on the training models and,
zero-shot, on the test models, at the uniform Q3_K / Q4_K / Q5_K sizes.

    python bench/sac_variants.py prepare            # pickle the tables bench/sac_transfer.py measured
    python bench/sac_variants.py run VARIANT SECONDS OUT_DIR   # one variant (one CPU thread)
    python bench/sac_variants.py uniform            # the uniform allocations' regret, for reference
    python bench/sac_variants.py table CURVES.jsonl # the summary table

The variants ran in parallel, one process per variant, on the lent machine's 16 CPU cores
(`for v in ...; do python bench/sac_variants.py run $v 440 $OUT & done`); what they changed:
- gamma: 1.0 instead of 0.99 (the episode is a finite knapsack; discounting devalues the budget end),
- rscale: rewards × 10 (SAC's entropy bonus vs reward scale),
- shaped: each step's cost minus the MILP pick's cost for that tensor (same optimal policy: the
  subtracted sum is fixed per episode; less variance),
- neutral: the action's range shrunk by the tensor's share of the weights still to allocate,
- lr, gradient steps per env step, network width, seed.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PROBLEMS = Path(os.environ.get("SAC_PROBLEMS", "/tmp/haloquant-sac/problems.pkl"))
CACHE = Path("/tmp/haloquant-sac")  # bench/sac_transfer.py's cache: one folder per model
TRAIN = ["ref-llama-a", "ref-llama-fam-shallow", "ref-llama-fam-mqa", "ref-llama-fam-deep", "ref-llama-fam-untied"]
TEST = ["ref-llama-tiny", "ref-llama-gqa"]
TRAIN_BUDGETS = [float(b) for b in np.round(np.arange(3.0, 6.0 + 1e-9, 0.25), 4)]  # train_policy's grid
EVAL_BUDGETS = {3.4375: "Q3_K", 4.5: "Q4_K", 5.5: "Q5_K"}

VARIANTS = {
    "base": {},  # what train_policy does (policies/sac-llama-family)
    "base_seed1": {"seed": 1},
    "g1": {"gamma": 1.0},
    "rs10": {"rscale": 10.0},
    "shaped": {"shaped": True},
    "shaped_g1": {"shaped": True, "gamma": 1.0},
    "shaped_rs10": {"shaped": True, "rscale": 10.0},
    "shaped_rs10_seed1": {"shaped": True, "rscale": 10.0, "seed": 1},
    "shaped_rs10_lr3e-4": {"shaped": True, "rscale": 10.0, "lr": 3e-4},
    "shaped_rs10_gs2": {"shaped": True, "rscale": 10.0, "gs": 2},
    "shaped_rs10_256": {"shaped": True, "rscale": 10.0, "net": [256, 256]},
    "neutral": {"neutral": True},
    "neutral_shaped_rs10": {"neutral": True, "shaped": True, "rscale": 10.0},
}


def prepare() -> None:
    """Every model's AllocationProblem with the MILP optimum and picks at each budget."""
    from haloquant.artifacts import read_json
    from haloquant.policy import AllocationProblem
    from haloquant.schemas.artifacts import LayerEmbeddings, SensitivityTable
    from haloquant.schemas.params import AllocationSpec
    from haloquant.tasks.allocate import allocate_bits

    out = {}
    for m in TRAIN + TEST:
        d = CACHE / m / "sensitivity-kl_calibrated"
        table = SensitivityTable.model_validate(read_json(d / "sensitivity.json"))
        p = AllocationProblem.build(table, LayerEmbeddings.model_validate(read_json(d / "embeddings.json")))
        picks = {}
        for b in sorted(set(TRAIN_BUDGETS) | set(EVAL_BUDGETS)):
            r = allocate_bits(AllocationSpec(budget={"bits_per_weight": b}), table)
            p.optimum[b] = r.objective
            picks[b] = [p.formats.index(c.format) for c in r.tensors]
        out[m] = {"problem": p, "picks": picks}
    PROBLEMS.write_bytes(pickle.dumps({"problems": out, "train": TRAIN, "test": TEST}))
    print(f"wrote {PROBLEMS}")


def _load():
    d = pickle.loads(PROBLEMS.read_bytes())
    for v in d["problems"].values():
        v["problem"].picks = v["picks"]
    return {m: v["problem"] for m, v in d["problems"].items()}


def desired_bits(scale, a: float, affordable: float, share: float, neutral: bool) -> float:
    width = (scale.hi - scale.lo) / 2 * ((1 - share) if neutral else 1.0)
    return float(np.clip(affordable + float(np.clip(a, -1, 1)) * width, scale.lo, scale.hi))


def make_env(problems, scale, cfg):
    from haloquant.policy import OVER_CLIFF, OVER_SLOPE, UNDER_SLOPE, AllocationEnv, affordable_bits, nearest_format

    class VariantEnv(AllocationEnv):
        def step(self, action):
            p, t = self.p, self.t
            share = float(p.n_weights[t] / p.n_weights[t:].sum())
            bits = desired_bits(self.scale, float(np.asarray(action).ravel()[0]),
                                affordable_bits(p, t, self.used, self.budget), share, cfg.get("neutral", False))
            f = nearest_format(p, t, bits)
            cost = p.costs[t, f] - (p.costs[t, p.picks[self.target][t]] if cfg.get("shaped") else 0.0)
            reward = -cost / self.ref
            self.quality -= p.costs[t, f] / self.ref
            self.used += p.nbytes[t, f]
            self.prev = float(p.bpw[f])
            self.t += 1
            done = self.t == len(p.names)
            info = {}
            if done:
                over = self.used / self.budget - 1
                reward -= OVER_CLIFF + OVER_SLOPE * over if over > 0 else UNDER_SLOPE * -over
                info = {"quality": self.quality, "over": over}
            return self._obs(), float(reward) * cfg.get("rscale", 1.0), done, False, info

    return VariantEnv(problems, TRAIN_BUDGETS, scale, cfg.get("seed", 0))


def regret(predict, p, b: float, scale, neutral: bool) -> float:
    from haloquant.policy import affordable_bits, nearest_format, observation, proxy_regret, repair

    budget = np.floor(b * p.total_weights / 8)
    picks, want, used, prev = [], [], 0.0, b
    for t in range(len(p.names)):
        share = float(p.n_weights[t] / p.n_weights[t:].sum())
        bits = desired_bits(scale, predict(observation(p, t, b, used, budget, prev, scale)),
                            affordable_bits(p, t, used, budget), share, neutral)
        f = nearest_format(p, t, bits)
        picks.append(f)
        want.append(bits)
        used += p.nbytes[t, f]
        prev = float(p.bpw[f])
    return proxy_regret(p, repair(p, picks, want, budget), b)


def run(name: str, seconds: float, out: Path, chunk: int = 5000) -> None:
    import torch
    from stable_baselines3 import SAC

    from haloquant.policy import BitsScale

    torch.set_num_threads(1)
    cfg, P = VARIANTS[name], _load()
    train = [P[m] for m in TRAIN]
    feats = np.concatenate([p.features for p in train])
    scale = BitsScale(float(min(p.bpw.min() for p in train)), float(max(p.bpw.max() for p in train)),
                      tuple(feats.mean(0).tolist()), tuple(np.maximum(feats.std(0), 1e-3).tolist()))
    model = SAC("MlpPolicy", make_env(train, scale, cfg), seed=cfg.get("seed", 0),
                policy_kwargs={"net_arch": cfg.get("net", [128, 128])}, learning_starts=1000,
                learning_rate=cfg.get("lr", 1e-3), batch_size=256, gradient_steps=cfg.get("gs", 1),
                gamma=cfg.get("gamma", 0.99), device="cpu", verbose=0)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model.learn(chunk, reset_num_timesteps=False)
        pred = lambda o: float(model.predict(o, deterministic=True)[0][0])  # noqa: E731
        reg = {m: [regret(pred, P[m], b, scale, cfg.get("neutral", False)) for b in EVAL_BUDGETS] for m in P}
        print(json.dumps({"variant": name, "steps": model.num_timesteps, "s": round(time.perf_counter() - t0),
                          "train": round(float(np.mean([reg[m] for m in TRAIN])), 3),
                          **{m.replace("ref-llama-", ""): [round(x, 3) for x in reg[m]] for m in P}}), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / f"{name}.zip")


def uniform() -> dict:
    from haloquant.policy import proxy_regret

    P = _load()
    return {m: [proxy_regret(p, [p.formats.index(f)] * len(p.names), b) for b, f in EVAL_BUDGETS.items()]
            for m, p in P.items()}


def table(curves: Path) -> None:
    rows = [json.loads(line) for line in curves.read_text().splitlines() if line.startswith("{")]
    uni = uniform()
    short = {m: m.replace("ref-llama-", "") for m in TRAIN + TEST}
    mean = lambda r, ms: float(np.mean([r[short[m]] for m in ms]))  # noqa: E731
    print("Proxy regret (allocation's sensitivity cost / MILP's − 1; 0 = MILP), mean over the three budgets "
          "(uniform Q3_K, Q4_K, Q5_K sizes); train = the 5 training models, zero-shot = ref-llama-tiny and ref-llama-gqa\n")
    print("| variant | steps in the wall time | train, last | train, best snapshot | tiny, last | gqa, last |")
    print("|---|---|---|---|---|---|")
    print(f"| uniform (no policy) | | {np.mean([uni[m] for m in TRAIN]):.3f} | | {np.mean(uni['ref-llama-tiny']):.3f} | "
          f"{np.mean(uni['ref-llama-gqa']):.3f} |")
    for v in VARIANTS:
        rs = [r for r in rows if r["variant"] == v]
        if not rs:
            continue
        last = rs[-1]
        best = min(rs, key=lambda r: r["train"])
        print(f"| {v} | {last['steps']:,} | {mean(last, TRAIN):.3f} | {best['train']:.3f} ({best['steps']:,}) | "
              f"{np.mean(last['tiny']):.3f} | {np.mean(last['gqa']):.3f} |")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    cmd = sys.argv[1]
    if cmd == "prepare":
        prepare()
    elif cmd == "run":
        run(sys.argv[2], float(sys.argv[3]), Path(sys.argv[4]))
    elif cmd == "uniform":
        print(json.dumps(uniform(), indent=1))
    elif cmd == "table":
        table(Path(sys.argv[2]))
