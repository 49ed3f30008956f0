"""Issue 2's table: the default pipeline on real models at two budgets, scored by torch and llama.cpp.

    python bench/pipeline_table.py --models data/models/ref-llama-tiny ../shared/models/ref-llama-a \
        --budgets 4.5 3.5 --chunks 100

For each model: calibrate and sensitivity once (they do not depend on the budget, as under DVC),
then allocate → … → validate per budget, plus a uniform-format baseline of about the same size.
Prints a markdown table and each stage's wall time; writes the raw numbers to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from haloquant.tasks.runner import preflight
from haloquant.schemas.params import load_params
from haloquant.tasks import STAGES

REPO = Path(__file__).resolve().parent.parent
UNIFORM = {4.5: "Q4_K", 3.5: "Q3_K"}


def params_for(model: Path, budget: float, chunks: int, formats: list[str] | None = None) -> dict:
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["model"]["path"] = str(model.resolve())
    for sec in ("calibration", "validate"):
        p[sec]["text"] = str((REPO / p[sec]["text"]).resolve())
    p["allocation"]["budget"] = {"bits_per_weight": budget}
    p["validate"]["max_chunks"] = chunks
    p["validate"]["gate"] = {}
    if formats:
        p["sensitivity"]["formats"] = formats
    return p


def run(folder: Path, data: dict, stages: list[str]) -> dict[str, float]:
    folder.mkdir(parents=True, exist_ok=True)
    pf = folder / "params.yaml"
    pf.write_text(yaml.safe_dump(data, sort_keys=False))
    params = load_params(pf)
    preflight(params)
    times = {}
    for s in STAGES:
        if s.name in stages:
            t0 = time.perf_counter()
            s.run(params, folder / "artifacts")
            times[s.name] = time.perf_counter() - t0
    return times


def link_shared(src: Path, dst: Path) -> None:
    (dst / "artifacts").mkdir(parents=True, exist_ok=True)
    for stage in ("calibrate", "sensitivity"):
        target = dst / "artifacts" / stage
        if not target.exists():
            target.symlink_to((src / "artifacts" / stage).resolve())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", type=Path, default=[REPO / "data/models/ref-llama-tiny"])
    ap.add_argument("--budgets", nargs="+", type=float, default=[4.5, 3.5])
    ap.add_argument("--chunks", type=int, default=100)
    ap.add_argument("--out", type=Path, default=Path("/tmp/haloquant-bench"))
    ap.add_argument("--no-uniform", action="store_true", help="skip the uniform-format baselines")
    args = ap.parse_args()
    rows, timings = [], {}
    downstream = [s.name for s in STAGES][2:]
    for model in args.models:
        base = args.out / model.name
        for budget in args.budgets:
            variants = [("haloquant MILP", None), (f"uniform {UNIFORM.get(budget, 'Q4_K')}", [UNIFORM.get(budget, "Q4_K")])]
            variants = variants[:1] if args.no_uniform else variants
            for label, formats in variants:
                folder = base / f"{budget}-{label.split()[0]}-{label.split()[-1]}"
                data = params_for(model, budget if formats is None else 16.0, args.chunks, formats)
                if formats is None and budget == args.budgets[0]:
                    t = run(folder, data, [s.name for s in STAGES])
                    shared = folder
                else:
                    link_shared(shared, folder) if formats is None else None
                    t = run(folder, data, downstream if formats is None else [s.name for s in STAGES])
                timings[f"{model.name} {budget} {label}"] = t
                v = json.loads((folder / "artifacts/validate/report.json").read_text())
                rows.append({"model": model.name, "budget": budget, "variant": label,
                             "bpw": v["bits_per_weight"], "ppl_float": v["ppl_float"], "ppl_torch": v["ppl_quant"],
                             "ppl_llama_cpp": v["runtimes"]["llama_cpp"]["ppl"],
                             "gap": v["runtimes"]["llama_cpp"]["ppl_gap_vs_torch"], "kl": v["kl_mean"],
                             "gguf_bytes": v["gguf_bytes"],
                             "onnx_max_abs_logit_err": v["runtimes"]["onnxruntime"]["max_abs_logit_error"]})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "timings": timings}, indent=2))
    print(f"\nWikiText-2 test, ctx 512, first {args.chunks} chunks; calibration: WikiText-2 validation\n")
    print("| model | budget (bpw) | variant | bpw | float ppl | quant ppl (torch) | ppl (llama.cpp) | gap | KL | GGUF bytes | ONNX max logit err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['budget']} | {r['variant']} | {r['bpw']:.3f} | {r['ppl_float']:.3f} | "
              f"{r['ppl_torch']:.3f} | {r['ppl_llama_cpp']:.3f} | {100 * r['gap']:.3f} % | {r['kl']:.4f} | "
              f"{r['gguf_bytes']:,} | {r['onnx_max_abs_logit_err']:.1e} |")
    print("\nStage wall times (s):")
    names = [s.name for s in STAGES]
    print("| run | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for k, t in timings.items():
        print(f"| {k} | " + " | ".join(f"{t[n]:.1f}" if n in t else "(shared)" for n in names) + " |")


if __name__ == "__main__":
    main()
