"""Issue 5's bench: Scale-Fold off vs on, allocation on, scored by llama.cpp.

    python bench/scale_fold.py --model ../shared/models/ref-llama-a --budgets 3.0 3.5 4.0 --chunks 100

Calibrate and sensitivity once; per budget: allocate, then scale_fold (identity | scale) →
quantize → export_gguf, each GGUF scored by llama.cpp's perplexity on WikiText-2 test at ctx 512.
Prints the table and a summary of the per-group outlier statistics before and after folding.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from haloquant.llamacpp import llama_cpp_perplexity
from haloquant.schemas.params import (AllocationSpec, FoldSpec, GGUFSpec,
                            SensitivitySpec)
from haloquant.tasks.allocate import allocate
from haloquant.tasks.export_gguf import export_gguf
from haloquant.tasks.quantize import quantize
from haloquant.tasks.scale_fold import scale_fold
from haloquant.tasks.sensitivity import score_sensitivity

from common import REPO, plain, setup  # noqa: E402  (bench/ is on sys.path when run as a script)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=REPO.parent / "shared/models/ref-llama-a")
    ap.add_argument("--budgets", nargs="+", type=float, default=[3.0, 3.5, 4.0])
    ap.add_argument("--chunks", type=int, default=100)
    ap.add_argument("--method", default="rtn", choices=["rtn", "gptq"])
    ap.add_argument("--out", type=Path, default=Path("/tmp/haloquant-fold"))
    args = ap.parse_args()
    spec, calib, text = setup(args.model, args.out)
    qspec = plain(method=args.method)
    sens = args.out / "sensitivity"
    if not (sens / "sensitivity.json").is_file():
        score_sensitivity(spec, SensitivitySpec(formats=["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]), qspec,
                          calib, sens)
    rows, groups = [], []
    for budget in args.budgets:
        d = args.out / str(budget)
        allocate(AllocationSpec(budget={"bits_per_weight": budget}), sens, d / "allocate")
        row = {"budget": budget}
        for method in ("identity", "scale"):
            f = d / method
            res = scale_fold(spec, FoldSpec(method=method), calib, d / "allocate", f / "scale_fold")
            quantize(spec, qspec, calib, d / "allocate", f / "scale_fold", f / "quantize")
            export_gguf(spec, GGUFSpec(), f / "quantize", f / "gguf")
            row[method] = llama_cpp_perplexity(f / "gguf" / "model.gguf", text, 512, args.chunks)["ppl"]
            row[f"{method}_bytes"] = (f / "gguf" / "model.gguf").stat().st_size
            if method == "scale":
                row["folded_groups"] = sum(g["alpha"] > 0 for g in res.groups)
                row["groups"] = len(res.groups)
                groups += [{**g, "budget": budget} for g in res.groups]
        rows.append(row)
        print(json.dumps(row), flush=True)
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "groups": groups}, indent=2))
    print(f"\n{args.model.name}: llama.cpp perplexity, WikiText-2 test, ctx 512, first {args.chunks} chunks, "
          f"quantizer {args.method}\n")
    print("| budget (bpw) | GGUF bytes | fold off | fold on | change | groups folded |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget']} | {r['scale_bytes']:,} | {r['identity']:.3f} | {r['scale']:.3f} | "
              f"{100 * (r['scale'] / r['identity'] - 1):+.2f} % | {r['folded_groups']}/{r['groups']} |")
    print("\nOutlier statistics of the linears' inputs, median over groups (before → after folding):")
    print("| group kind | α chosen (median) | channel max / median | kurtosis of channel maxima | weight col max / median |")
    print("|---|---|---|---|---|")
    for kind in ("attn_in", "mlp_in", "v_o", "up_down"):
        gs = [g for g in groups if g["group"].endswith(kind)]
        if not gs:
            continue
        med = lambda k, w: float(np.median([g[w][k] for g in gs]))  # noqa: E731
        print(f"| {kind} | {np.median([g['alpha'] for g in gs]):.2f} | {med('channel_max_ratio', 'before'):.1f} → "
              f"{med('channel_max_ratio', 'after'):.1f} | {med('kurtosis', 'before'):.1f} → {med('kurtosis', 'after'):.1f} | "
              f"{med('w_col_max_ratio', 'before'):.1f} → {med('w_col_max_ratio', 'after'):.1f} |")


if __name__ == "__main__":
    main()
