"""Issue 16.1's bench: GPTQ vs GPTQ + block-output reconstruction on llama.cpp's preset type maps.

    python bench/block_tuning.py --model ../shared/models/ref-llama-a --presets Q2_K Q3_K_M Q4_K_M --chunks 100

For each preset: llama.cpp's own type map for this model (llama-quantize on the F16 file), then
haloquant's GPTQ on it, and the same GPTQ codes tuned block by block against the float blocks'
outputs (quantize.block_tuning, haloquant/reconstruct.py) — both the same tensor bytes, scored by
llama.cpp (WikiText-2 test, ctx 512, first --chunks chunks): perplexity, KL from the F16 file, the
95 % paired interval of tuned vs GPTQ, and quantize's wall time. With --mixed, haloquant's own
allocation at the preset's tensor bytes (kl_calibrated sensitivity with the GPTQ quantizer →
MILP) is built the same two ways. Calibration: WikiText-2 validation, 64 × 256 tokens
(bench/common.py).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from haloquant.llamacpp import llama_cpp_perplexity
from haloquant.modelio import load_model, quantizable_tensors
from haloquant.presets import preset_type_map, tensor_data_bytes
from haloquant.schemas.params import BlockTuningSpec, SensitivitySpec
from haloquant.tasks.sensitivity import score_sensitivity

from common import plain, setup  # noqa: E402  (bench/ is on sys.path when run as a script)
from kquant_presets import KQUANTS, build, build_mixed  # noqa: E402
from paired_ppl import TOKENS_PER_CHUNK, paired  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--presets", nargs="+", default=["Q2_K", "Q3_K_M", "Q4_K_M"])
    ap.add_argument("--chunks", type=int, default=100)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--mixed", action="store_true", help="also haloquant's own allocation at each preset's bytes")
    args = ap.parse_args()
    out = args.out or Path(f"/tmp/haloquant-blocktune-{args.model.name}")
    spec, calib, text = setup(args.model, out)
    spec = spec.model_copy(update={"device": args.device})
    infos = quantizable_tensors(load_model(spec.path, "cpu"))
    f16, _ = build(spec, infos, {t.gguf_name: "F16" for t in infos}, "rtn", calib, out / "F16")
    ref = llama_cpp_perplexity(f16, text, 512, args.chunks, keep_logprobs=out / "f16_logprobs.npy")
    f16_logprobs = ref.pop("logprobs")
    methods = {"gptq": plain(method="gptq"),
               "gptq+tuning": plain(method="gptq", block_tuning=BlockTuningSpec(iters=args.iters, lr=args.lr))}
    rows = []
    for preset in args.presets:
        d = out / preset
        d.mkdir(parents=True, exist_ok=True)
        type_map = preset_type_map(f16, preset, d / "llama.cpp.gguf")
        row = {"preset": preset}
        builds = [(name, qspec, None) for name, qspec in methods.items()]
        if args.mixed:
            sens = out / "sensitivity"
            if not (sens / "sensitivity.json").is_file():
                score_sensitivity(spec, SensitivitySpec(formats=KQUANTS + ["Q8_0"]), plain(method="gptq"),
                                  calib, sens)
            builds += [(f"mixed {name}", qspec, sens) for name, qspec in methods.items()]
        for name, qspec, sens in builds:
            t0 = time.perf_counter()
            if sens is None:
                gguf, secs = build(spec, infos, type_map, qspec, calib, d / name)
            else:
                gguf = build_mixed(spec, sens, tensor_data_bytes(d / "llama.cpp.gguf"), calib, d / name.replace(" ", "-"),
                                   qspec)
                secs = time.perf_counter() - t0
            r = llama_cpp_perplexity(gguf, text, 512, args.chunks, reference=f16_logprobs)
            row[name] = {"bytes": gguf.stat().st_size, "ppl": r["ppl"], "kl": r["kl"], "seconds": secs,
                         "chunk_nll": r["chunk_nll"]}
            print(preset, name, row[name]["bytes"], f"{r['ppl']:.4f}", f"{r['kl']:.5f}", f"{secs:.0f} s", flush=True)
        for prefix in ("", "mixed ") if args.mixed else ("",):
            row[prefix + "tuned_vs_gptq"] = paired(np.array(row[prefix + "gptq+tuning"]["chunk_nll"]),
                                                   np.array(row[prefix + "gptq"]["chunk_nll"]), TOKENS_PER_CHUNK)
        rows.append(row)
    (out / "results.json").write_text(json.dumps({"f16_ppl": ref["ppl"], "iters": args.iters, "rows": rows}))
    print(f"\n{args.model.name}: llama.cpp perplexity, WikiText-2 test, ctx 512, first {args.chunks} chunks; "
          f"F16 {ref['ppl']:.3f}; block tuning {args.iters} iterations per block on {args.device}\n")
    print("| type map | bytes | GPTQ ppl | KL | s | GPTQ + tuning ppl | KL | s | tuned vs GPTQ (95 %) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for prefix in ("", "mixed ") if args.mixed else ("",):
            g, t = r[prefix + "gptq"], r[prefix + "gptq+tuning"]
            p, lo, hi = r[prefix + "tuned_vs_gptq"]
            label = f"{r['preset']} ({'haloquant allocation at its bytes' if prefix else 'llama.cpp types'})"
            print(f"| {label} | {g['bytes']:,} | {g['ppl']:.3f} | {g['kl']:.4f} | {g['seconds']:.0f} | "
                  f"{t['ppl']:.3f} | {t['kl']:.4f} | {t['seconds']:.0f} | {100 * p:+.2f} % ({100 * lo:+.2f} … "
                  f"{100 * hi:+.2f}) |")


if __name__ == "__main__":
    main()
