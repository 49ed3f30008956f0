"""Issue 16 (statistics correction): what quantize's corrections do to llama.cpp's perplexity.

    python bench/corrections.py --run /tmp/haloquant-kquants --chunks 100 --add correct_row_scales
    python bench/corrections.py --run /tmp/haloquant-kquants --add correct_input_scales [--base correct_row_scales]

Reuses a bench/kquant_presets.py run folder (its calibration, its allocations and its GPTQ files):
for each preset, the GPTQ file on llama.cpp's type map and haloquant's own allocation at the
preset's bytes ("mixed"; --labels rtn: the RTN file on the type map) are quantized again without
and with the corrections named by --add (same allocation, same quantizer; --base: corrections on
in both): `correct_row_scales` rescales each output row's block scales (haloquant/row_scale.py),
`correct_input_scales` each linear group's input channels through the norms and the v/up rows
(haloquant/input_scales.py); `block_tuning` is block-output tuning at 200 steps (haloquant/reconstruct.py).
Both files are scored by llama.cpp (WikiText-2 test, ctx 512, the
first --chunks chunks): perplexity with a 95 % paired interval of the "with" file against the
"without" one, and KL from the F16 file with its paired ratio. The files are the same size: only
fp16 scale fields and float norm weights change. (Before 2026-12-06 this was bench/row_scale.py.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from haloquant.llamacpp import llama_cpp_perplexity
from haloquant.schemas.params import BlockTuningSpec, GGUFSpec
from haloquant.tasks.export_gguf import export_gguf
from haloquant.tasks.quantize import quantize

from common import REPO, plain, setup  # noqa: E402  (bench/ is on sys.path when run as a script)
from paired_ppl import before_after_cells, paired_changes, scores_of  # noqa: E402

PRESETS = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_M"]
STORED = {"gptq": "haloquant GPTQ", "mixed": "haloquant mixed", "rtn": "haloquant RTN"}  # the run's results.json names
METHOD = {"gptq": "gptq", "mixed": "gptq", "rtn": "rtn"}  # the quantizer each of the run's files was made with
CORRECTIONS = {  # --add / --base name → QuantizeSpec values
    "correct_row_scales": {"correct_row_scales": True},
    "correct_input_scales": {"correct_input_scales": True},
    "block_tuning": {"block_tuning": BlockTuningSpec(iters=200)},  # AutoRound's default steps
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=REPO.parent / "shared/models/ref-llama-a")
    ap.add_argument("--run", type=Path, required=True, help="a bench/kquant_presets.py --out folder")
    ap.add_argument("--out", type=Path, default=None, help="default: RUN/corrections")
    ap.add_argument("--chunks", type=int, default=100)
    ap.add_argument("--presets", nargs="+", default=PRESETS)
    ap.add_argument("--labels", nargs="+", default=["gptq", "mixed"], choices=sorted(STORED),
                    help="the run's files: gptq / rtn on llama.cpp's type map, mixed: haloquant's allocation (GPTQ)")
    ap.add_argument("--add", nargs="+", choices=CORRECTIONS, required=True, help="on in the 'with' file only")
    ap.add_argument("--base", nargs="*", choices=CORRECTIONS, default=[], help="on in both files")
    args = ap.parse_args()
    out = (args.out or args.run / "corrections") / "+".join(args.base + args.add)
    spec, calib, text = setup(args.model, args.run)
    f16 = llama_cpp_perplexity(args.run / "F16" / "gguf" / "model.gguf", text, 512, args.chunks, keep_logprobs=True)
    ref = f16.pop("logprobs")
    stored = json.loads((args.run / "results.json").read_text())
    assert stored.get("chunks", args.chunks) == args.chunks
    print(f"F16: ppl {f16['ppl']:.4f}", flush=True)
    rows = []
    for preset in args.presets:
        for label in args.labels:
            src = args.run / preset / label
            files, secs = {}, {}
            for k, on in (("without", False), ("with", True)):  # both with this code: only the correction differs
                dst = out / preset / label / k
                t0 = time.perf_counter()
                flags = {k: v for c in args.base + (args.add if on else []) for k, v in CORRECTIONS[c].items()}
                quantize(spec, plain(method=METHOD[label], **flags), calib, src / "allocate",
                         src / "scale_fold", dst / "quantize")
                secs[k] = time.perf_counter() - t0
                export_gguf(spec, GGUFSpec(), dst / "quantize", dst / "gguf")
                files[k] = dst / "gguf" / "model.gguf"
            a = scores_of(files["without"], src / "gguf" / "model.gguf", stored, f"{preset}/{STORED[label]}", text,
                          args.chunks, ref)
            b = llama_cpp_perplexity(files["with"], text, 512, args.chunks, reference=ref)
            (out / preset / label / "with" / "score.json").write_text(json.dumps(b))  # per chunk, for later pairings
            (d, lo, hi), (k, klo, khi) = paired_changes(b, a)
            row = {"preset": preset, "label": label, "bytes": files["with"].stat().st_size,
                   "bytes_without": files["without"].stat().st_size, "ppl_without": a["ppl"], "ppl_with": b["ppl"],
                   "ppl_change": [d, lo, hi], "kl_without": a["kl"], "kl_with": b["kl"], "kl_change": [k, klo, khi],
                   "quantize_s": secs["with"], "quantize_s_without": secs["without"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    (out / f"results-{'-'.join(args.labels)}.json").write_text(json.dumps({"chunks": args.chunks, "f16_ppl": f16["ppl"], "rows": rows},
                                                 indent=2))
    print(f"\n{args.model.name}: llama.cpp, WikiText-2 test, ctx 512, first {args.chunks} chunks; F16 {f16['ppl']:.4f}; "
          f"without: {' + '.join(args.base) or 'no correction'}; with: also {' + '.join(args.add)}")
    print("| preset size | file | bytes | ppl without | ppl with | change (95 %) | KL without | KL with | "
          "change (95 %) | quantize s (without / with) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['label']} | {r['bytes']:,} | {before_after_cells(r)} | "
              f"{r['quantize_s_without']:.0f} / {r['quantize_s']:.0f} |")


if __name__ == "__main__":
    main()
