"""Issue 6's bench: RAMP's SAC allocator trained on some models, applied zero-shot to others,
against the exact MILP allocation and uniform k-quants of the same size.

    M=/work/models   # bench/make_models.py: the training family fam-* and the test model gqa
    python bench/sac_transfer.py --train-models ../shared/models/ref-llama-a $M/ref-llama-fam-shallow \\
            $M/ref-llama-fam-mqa $M/ref-llama-fam-deep $M/ref-llama-fam-untied \\
        --models ../shared/models/ref-llama-a data/models/ref-llama-tiny $M/ref-llama-gqa \\
        --policy policies/sac-llama-family --timesteps 80000 --chunks 100

ref-llama-tiny and ref-llama-gqa (10 layers, GQA 8:2) are never trained on: zero-shot.
Per model: calibrate; `kl_calibrated` sensitivity (what MILP needs: T forward passes) and `none`
sensitivity (what SAC needs: embeddings and sizes only), both timed. The policy is trained on the
training models' tables unless the policy folder already exists. Budgets are the sizes of uniform
Q3_K, Q4_K and Q5_K, so the uniform files are exactly the budget. Every file: RTN quantizer,
GGUF, llama.cpp perplexity on WikiText-2 test at ctx 512. Also printed: each allocation's proxy
cost / MILP's (the reward's quality term), SAC's apply time, and the training cost.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from haloquant.artifacts import read_json, write_json
from haloquant.formats import get_format
from haloquant.modelio import load_model, quantizable_tensors
from haloquant.presets import allocation_from_type_map
from haloquant.schemas.artifacts import SensitivityTable
from haloquant.schemas.params import AllocationSpec, QuantizeSpec, SensitivitySpec, TrainPolicySpec
from haloquant.tasks.allocate import allocate
from haloquant.tasks.sensitivity import score_sensitivity
from haloquant.tasks.train_policy import train_policy

from common import REPO, build_and_score, setup  # noqa: E402  (bench/ is on sys.path when run as a script)
FORMATS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]
UNIFORM = ["Q3_K", "Q4_K", "Q5_K"]


def proxy_cost(table: SensitivityTable, alloc: dict) -> float:
    fmt = {t["gguf_name"]: t["format"] for t in alloc["tensors"]}
    return sum(t.candidates[fmt[t.gguf_name]].error for t in table.tensors)


_prepared: dict[Path, dict] = {}


def prepare(model: Path, out: Path) -> dict:
    """Calibrate and measure `model` once (cached in out/<model>): the `kl_calibrated` table MILP and
    training need, and the `none` table (embeddings and sizes) SAC needs, each timed."""
    if model in _prepared:
        return _prepared[model]
    d = out / model.name
    spec, calib, text = setup(model, d)
    info = {"spec": spec, "calib": calib, "text": text, "dir": d}
    for metric in ("kl_calibrated", "none"):
        sens = d / f"sensitivity-{metric}"
        if not (sens / "embeddings.json").is_file():
            score_sensitivity(spec, SensitivitySpec(formats=FORMATS, metric=metric), QuantizeSpec(), calib, sens)
        info[f"{metric}_s"] = read_json(sens / "sensitivity.json")["seconds"]
        info[metric] = sens
    _prepared[model] = info
    return info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-models", nargs="+", type=Path, default=[REPO.parent / "shared/models/ref-llama-a"],
                    help="the policy's training models (not the test models, for a zero-shot test)")
    ap.add_argument("--models", nargs="+", type=Path,
                    default=[REPO.parent / "shared/models/ref-llama-a", REPO / "data/models/ref-llama-tiny",
                             Path("/work/models/ref-llama-gqa")])  # make_models.py finish's default
    ap.add_argument("--policy", type=Path, default=REPO / "policies/sac-llama-family")
    ap.add_argument("--timesteps", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunks", type=int, default=100)
    ap.add_argument("--out", type=Path, default=Path("/tmp/haloquant-sac"))
    args = ap.parse_args()

    if not (args.policy / "policy.json").is_file():
        train = [prepare(m, args.out) for m in args.train_models]
        train_policy(TrainPolicySpec(timesteps=args.timesteps, seed=args.seed,
                                     eval_every=max(args.timesteps // 20, 500)),
                     [t["kl_calibrated"] for t in train], [t["calib"] for t in train], args.policy)
    card = read_json(args.policy / "policy.json")

    rows = []
    for model in args.models:
        m = prepare(model, args.out)
        table = SensitivityTable.model_validate(read_json(m["kl_calibrated"] / "sensitivity.json"))
        infos = quantizable_tensors(load_model(model, "cpu"))
        for uni in UNIFORM:
            bpw = get_format(uni).bits_per_weight
            d = m["dir"] / f"bpw-{bpw}"
            allocs = {}
            write_json(d / "uniform/allocate/allocation.json",
                       allocation_from_type_map(infos, {t.gguf_name: uni for t in infos}, f"uniform {uni}").model_dump())
            allocs["uniform"] = d / "uniform/allocate"
            allocate(AllocationSpec(budget={"bits_per_weight": bpw}), m["kl_calibrated"], d / "milp/allocate")
            allocs["milp"] = d / "milp/allocate"
            t0 = time.perf_counter()
            allocate(AllocationSpec(budget={"bits_per_weight": bpw}, solver="sac", policy=args.policy), m["none"],
                     d / "sac/allocate")
            sac_s = time.perf_counter() - t0
            allocs["sac"] = d / "sac/allocate"
            res = {}
            for name, a in allocs.items():
                alloc = read_json(a / "allocation.json")
                # scored files are reused while the allocation and chunk count are unchanged
                key = {"tensors": alloc["tensors"], "chunks": args.chunks}
                done = d / name / "score.json"
                if done.is_file() and read_json(done)["key"] == key:
                    size, ppl = read_json(done)["bytes"], read_json(done)["ppl"]
                else:
                    size, ppl = build_and_score(m["spec"], m["calib"], a, d / name, m["text"], args.chunks)
                    write_json(done, {"key": key, "bytes": size, "ppl": ppl})
                n_weights = sum(t.n_weights for t in table.tensors)
                res[name] = {"bytes": size, "ppl": ppl, "proxy": proxy_cost(table, alloc),
                             "bpw": 8 * sum(t["bytes"] for t in alloc["tensors"]) / n_weights}
            row = {"model": model.name, "budget": uni, "bpw": bpw, "sac_apply_s": sac_s, **{
                f"{k}_{f}": v for k, r in res.items() for f, v in r.items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)

    result = {"rows": rows, "card": card,
              "measurement_s": {m.name: {"kl_calibrated": prepare(m, args.out)["kl_calibrated_s"],
                                       "none": prepare(m, args.out)["none_s"]}
                                for m in args.models}}
    (args.out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    trained_on = ", ".join(Path(t["model_path"]).name for t in card["trained_on"])
    print(f"\nSAC policy trained on {trained_on}: {card['timesteps']} steps "
          f"({card['episodes']} episodes, {card['reward_evaluations']} reward look-ups), {card['seconds']:.0f} s wall "
          f"on this CPU; final proxy regret {card['final_proxy_regret']:.3f}\n")
    print(f"llama.cpp perplexity, WikiText-2 test, ctx 512, first {args.chunks} chunks; RTN quantizer for all\n")
    print("| model | budget (= uniform) | uniform ppl | MILP ppl | SAC ppl | SAC vs MILP | SAC vs uniform | "
          "SAC bytes ≤ uniform | proxy SAC/MILP | SAC apply (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['budget']} {r['bpw']:.3f} bpw | {r['uniform_ppl']:.3f} | {r['milp_ppl']:.3f} | "
              f"{r['sac_ppl']:.3f} | {100 * (r['sac_ppl'] / r['milp_ppl'] - 1):+.2f} % | "
              f"{100 * (r['sac_ppl'] / r['uniform_ppl'] - 1):+.2f} % | {r['sac_bytes']:,} ≤ {r['uniform_bytes']:,} | "
              f"{r['sac_proxy'] / r['milp_proxy']:.2f} | {r['sac_apply_s']:.2f} |")
    print("\nMeasurement each allocator needs (sensitivity stage, s): " + ", ".join(
        f"{k}: MILP {v['kl_calibrated']:.0f}, SAC {v['none']:.1f}" for k, v in result["measurement_s"].items()))
    ppl = np.array([[r[f"{k}_ppl"] for k in ("uniform", "milp", "sac")] for r in rows])
    prox = np.array([[r[f"{k}_proxy"] for k in ("uniform", "milp", "sac")] for r in rows])
    agree = np.mean([np.array_equal(np.argsort(a), np.argsort(b)) for a, b in zip(ppl, prox)])
    print(f"Proxy check: the proxy cost ranks uniform/MILP/SAC as llama.cpp's perplexity does in "
          f"{100 * agree:.0f} % of the {len(rows)} (model, budget) rows")


if __name__ == "__main__":
    main()
