"""Issue 16 (part 5): what allocation.refine — the MILP's formats refined by measured end-to-end KL — does to
llama.cpp's perplexity, and what it costs.

    python bench/refine.py --run /tmp/haloquant-kquants --chunks 100 --evaluations 200

Reuses a bench/kquant_presets.py run folder (its calibration, its sensitivity table — GPTQ quantizer — and its
"haloquant mixed" allocations at llama.cpp's preset sizes): for each preset the MILP allocation at the same
tensor bytes is refined (`allocation.refine`: a local search of one-up/one-down format moves, each kept only if
the whole quantized model's KL on the last --sequences calibration sequences drops; haloquant/refine.py), then
both allocations are quantized with GPTQ and exported. Both files are scored by llama.cpp (WikiText-2 test,
ctx 512, the first --chunks chunks): perplexity with a 95 % paired interval of refined against unrefined, KL
from the F16 file with its paired ratio, bytes, and the refinement's time and measured calibration KL.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from haloquant.artifacts import read_json
from haloquant.llamacpp import llama_cpp_perplexity
from haloquant.schemas.params import AllocationSpec, FoldSpec, GGUFSpec
from haloquant.tasks.allocate import allocate
from haloquant.tasks.export_gguf import export_gguf
from haloquant.tasks.quantize import quantize
from haloquant.tasks.scale_fold import scale_fold

from common import REPO, plain, setup  # noqa: E402  (bench/ is on sys.path when run as a script)
from paired_ppl import before_after_cells, paired_changes, scores_of  # noqa: E402

PRESETS = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_M"]
STORED = "haloquant mixed"  # the run's results.json name of its own allocation's file


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=REPO.parent / "shared/models/ref-llama-a")
    ap.add_argument("--run", type=Path, required=True, help="a bench/kquant_presets.py --out folder")
    ap.add_argument("--out", type=Path, default=None, help="default: RUN/refine")
    ap.add_argument("--chunks", type=int, default=100)
    ap.add_argument("--presets", nargs="+", default=PRESETS)
    ap.add_argument("--evaluations", type=int, default=200)
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--time-limit", type=float, default=900.0)
    ap.add_argument("--min-z", type=float, default=2.0)
    args = ap.parse_args()
    logging.basicConfig(format="%(asctime)s %(message)s")
    logging.getLogger("haloquant.refine").setLevel(logging.INFO)  # the search's kept moves
    out = args.out or args.run / "refine"
    spec, calib, text = setup(args.model, args.run)
    qspec = plain(method="gptq")
    f16 = llama_cpp_perplexity(args.run / "F16" / "gguf" / "model.gguf", text, 512, args.chunks, keep_logprobs=True)
    ref = f16.pop("logprobs")
    stored = json.loads((args.run / "results.json").read_text())
    print(f"F16: ppl {f16['ppl']:.4f}", flush=True)
    rows = []
    refine = {"evaluations": args.evaluations, "sequences": args.sequences, "time_limit_s": args.time_limit,
              "min_z": args.min_z}
    for preset in args.presets:
        src = args.run / preset / "mixed"
        budget = read_json(src / "allocate" / "allocation.json")["budget_spec"]
        files, secs, allocs = {}, {}, {}
        for k, r in (("without", {}), ("with", refine)):
            dst = out / preset / k
            t0 = time.perf_counter()
            allocs[k] = allocate(AllocationSpec(budget=budget, refine=r), args.run / "sensitivity", dst / "allocate",
                                 spec, qspec, calib)
            secs[k] = time.perf_counter() - t0
            scale_fold(spec, FoldSpec(), calib, dst / "allocate", dst / "scale_fold")
            quantize(spec, qspec, calib, dst / "allocate", dst / "scale_fold", dst / "quantize")
            export_gguf(spec, GGUFSpec(), dst / "quantize", dst / "gguf")
            files[k] = dst / "gguf" / "model.gguf"
        a = scores_of(files["without"], src / "gguf" / "model.gguf", stored, f"{preset}/{STORED}", text, args.chunks, ref)
        b = llama_cpp_perplexity(files["with"], text, 512, args.chunks, reference=ref)
        (d, lo, hi), (k, klo, khi) = paired_changes(b, a)
        rf = allocs["with"].refinement
        changed = sum(x.format != y.format for x, y in zip(allocs["without"].tensors, allocs["with"].tensors))
        row = {"preset": preset, "bytes": files["with"].stat().st_size,
               "bytes_without": files["without"].stat().st_size, "ppl_without": a["ppl"], "ppl_with": b["ppl"],
               "ppl_change": [d, lo, hi], "kl_without": a["kl"], "kl_with": b["kl"], "kl_change": [k, klo, khi],
               "refine_s": secs["with"], "allocate_s_without": secs["without"], "evaluations": rf["evaluations"],
               "moves_kept": len(rf["accepted"]), "tensors_changed": changed,
               "calib_kl": [rf["kl_start"], rf["kl_end"]]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (out / "results.json").write_text(json.dumps({"chunks": args.chunks, "f16_ppl": f16["ppl"], "refine": refine,
                                                  "rows": rows}, indent=2))
    print(f"\n{args.model.name}: llama.cpp, WikiText-2 test, ctx 512, first {args.chunks} chunks; F16 {f16['ppl']:.4f}; "
          f"refine {refine}")
    print("| preset size | bytes (without / with) | ppl without | ppl with | change (95 %) | KL without | KL with | "
          "change (95 %) | calibration KL (start → end) | evaluations, moves kept, tensors changed | refine s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['bytes_without']:,} / {r['bytes']:,} | {before_after_cells(r)} | "
              f"{r['calib_kl'][0]:.5f} → {r['calib_kl'][1]:.5f} | {r['evaluations']}, {r['moves_kept']}, "
              f"{r['tensors_changed']} | {r['refine_s']:.0f} |")


if __name__ == "__main__":
    main()
