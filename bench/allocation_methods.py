"""Issue 4's comparison of sensitivity metrics and solvers, so the defaults are chosen by measurement.

    python bench/allocation_methods.py --model ../shared/models/ref-llama-a --budgets 3.5 4.5 --chunks 50

Calibrate once; for each metric, one sensitivity table (RTN quantizer, so the comparison isolates
the metric); for each solver and budget, allocate → quantize (RTN) → GGUF, scored by llama.cpp's
perplexity on WikiText-2 test at ctx 512. Prints sensitivity time, solve time, objective, ppl.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from haloquant.llamacpp import llama_cpp_perplexity
from haloquant.schemas.params import (AllocationSpec, FoldSpec, GGUFSpec,
                            SensitivitySpec)
from haloquant.tasks.allocate import allocate
from haloquant.tasks.export_gguf import export_gguf
from haloquant.tasks.quantize import quantize
from haloquant.tasks.scale_fold import scale_fold
from haloquant.tasks.sensitivity import score_sensitivity

from common import REPO, plain, setup  # noqa: E402  (bench/ is on sys.path when run as a script)
METRICS = ["output_error", "hessian_trace", "kl_calibrated", "kl_end_to_end", "kl_fisher"]
SOLVERS = ["milp", "lagrangian", "greedy"]
FORMATS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=REPO.parent / "shared/models/ref-llama-a")
    ap.add_argument("--budgets", nargs="+", type=float, default=[3.5, 4.5])
    ap.add_argument("--chunks", type=int, default=50)
    ap.add_argument("--metrics", nargs="+", default=METRICS)
    ap.add_argument("--solvers", nargs="+", default=SOLVERS)
    ap.add_argument("--kl-sequences", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("/tmp/haloquant-alloc"))
    args = ap.parse_args()
    spec, calib, text = setup(args.model, args.out)
    rows = []
    for metric in args.metrics:
        sens = args.out / metric / "sensitivity"
        t0 = time.perf_counter()
        score_sensitivity(spec, SensitivitySpec(formats=FORMATS, metric=metric, kl_sequences=args.kl_sequences),
                          plain(), calib, sens)
        sens_s = time.perf_counter() - t0
        for budget in args.budgets:
            for solver in args.solvers:
                d = args.out / metric / f"{budget}-{solver}"
                t1 = time.perf_counter()
                res = allocate(AllocationSpec(budget={"bits_per_weight": budget}, solver=solver), sens, d / "allocate")
                solve_s = time.perf_counter() - t1
                scale_fold(spec, FoldSpec(), calib, d / "allocate", d / "scale_fold")
                quantize(spec, plain(), calib, d / "allocate", d / "scale_fold", d / "quantize")
                export_gguf(spec, GGUFSpec(), d / "quantize", d / "gguf")
                ppl = llama_cpp_perplexity(d / "gguf" / "model.gguf", text, 512, args.chunks)["ppl"]
                rows.append({"metric": metric, "sensitivity_s": sens_s, "budget": budget, "solver": solver,
                             "solve_s": solve_s, "bpw": res.bits_per_weight, "objective": res.objective,
                             "gguf_bytes": (d / "gguf" / "model.gguf").stat().st_size, "ppl": ppl})
                print(json.dumps(rows[-1]), flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"\n{args.model.name}: llama.cpp perplexity, WikiText-2 test, ctx 512, first {args.chunks} chunks; "
          "RTN quantizer\n")
    print("| metric | sensitivity (s) | budget (bpw) | solver | solve (ms) | bpw | GGUF bytes | ppl |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['metric']} | {r['sensitivity_s']:.0f} | {r['budget']} | {r['solver']} | {1000 * r['solve_s']:.1f} | "
              f"{r['bpw']:.3f} | {r['gguf_bytes']:,} | {r['ppl']:.3f} |")


if __name__ == "__main__":
    main()
