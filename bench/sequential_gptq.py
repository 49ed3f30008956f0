"""Issue 14 point 2: sequential GPTQ vs GPTQ on the float model's calibration Hessians.

    python bench/sequential_gptq.py --model ../shared/models/ref-llama-a --chunks 100

On llama.cpp's own type maps (Q2_K, Q3_K_M, Q4_K_M by default, from llama-quantize on the F16
file), the same tensors are quantized by GPTQ twice: with the calibrate stage's float-input
Hessians, and with `gptq.sequential` (each block's Hessians from the quantized blocks' outputs).
With `--mixed PRESET`, also haloquant's own allocation (sensitivity with GPTQ → MILP) at that
preset's tensor bytes, both ways. Every file is scored by llama.cpp (WikiText-2 test, ctx 512):
perplexity and KL from the F16 file, with 95 % paired-bootstrap intervals of sequential vs float.
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
from haloquant.schemas.params import SensitivitySpec

from common import REPO, plain, setup  # noqa: E402  (bench/ is on sys.path when run as a script)
from kquant_presets import KQUANTS, build, build_mixed  # noqa: E402
from paired_ppl import TOKENS_PER_CHUNK, paired, paired_ratio  # noqa: E402

SPECS = {"float Hessians": plain(method="gptq"),
         "sequential": plain(method="gptq", gptq={"sequential": True})}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=REPO.parent / "shared/models/ref-llama-a")
    ap.add_argument("--chunks", type=int, default=100)
    ap.add_argument("--presets", nargs="+", default=["Q2_K", "Q3_K_M", "Q4_K_M"])
    ap.add_argument("--mixed", nargs="*", default=["Q3_K_M"], help="presets whose size haloquant mixed is built at")
    ap.add_argument("--out", type=Path, default=Path("/tmp/haloquant-sequential"))
    args = ap.parse_args()
    spec, calib, text = setup(args.model, args.out)
    infos = quantizable_tensors(load_model(spec.path, "cpu"))
    f16, _ = build(spec, infos, {t.gguf_name: "F16" for t in infos}, "rtn", calib, args.out / "F16")
    r = llama_cpp_perplexity(f16, text, 512, args.chunks, keep_logprobs=True)
    ref = r.pop("logprobs")
    print(f"F16: {f16.stat().st_size:,} bytes, ppl {r['ppl']:.3f}", flush=True)

    rows = []
    if args.mixed:
        sens = args.out / "sensitivity"
        if not (sens / "sensitivity.json").is_file():
            from haloquant.tasks.sensitivity import score_sensitivity

            score_sensitivity(spec, SensitivitySpec(formats=KQUANTS + ["Q8_0"]), plain(method="gptq"), calib,
                              sens)
    for preset in args.presets:
        d = args.out / preset
        d.mkdir(parents=True, exist_ok=True)
        type_map = preset_type_map(f16, preset, d / "llama.cpp.gguf")
        builds = [("type map", label) for label in SPECS]
        if preset in args.mixed:
            builds += [("mixed", label) for label in SPECS]
        for kind, label in builds:
            t0 = time.perf_counter()
            if kind == "type map":
                path, _ = build(spec, infos, type_map, SPECS[label], calib, d / f"{kind}-{label}".replace(" ", "_"))
            else:
                path = build_mixed(spec, args.out / "sensitivity", tensor_data_bytes(d / "llama.cpp.gguf"), calib,
                                   d / f"{kind}-{label}".replace(" ", "_"), SPECS[label])
            secs = time.perf_counter() - t0
            s = llama_cpp_perplexity(path, text, 512, args.chunks, reference=ref)
            rows.append({"preset": preset, "kind": kind, "hessians": label, "bytes": path.stat().st_size,
                         "ppl": s["ppl"], "kl": s["kl"], "chunk_nll": s["chunk_nll"], "chunk_kl": s["chunk_kl"],
                         "build_s": secs})
            print(json.dumps({k: v for k, v in rows[-1].items() if not k.startswith("chunk")}), flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))

    print(f"\n{args.model.name}: llama.cpp, WikiText-2 test, ctx 512, first {args.chunks} chunks; F16 {r['ppl']:.3f}\n")
    print("| preset | allocation | bytes | ppl, float Hessians | ppl, sequential | Δ ppl (95 %) | KL, float | "
          "KL, sequential | Δ KL (95 %) | build s, float / sequential |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i in range(0, len(rows), 2):
        a, b = rows[i], rows[i + 1]
        _, lo, hi = paired(np.array(b["chunk_nll"]), np.array(a["chunk_nll"]), TOKENS_PER_CHUNK)
        rel, klo, khi = paired_ratio(np.array(b["chunk_kl"]), np.array(a["chunk_kl"]))
        print(f"| {a['preset']} | {a['kind']} | {b['bytes']:,} | {a['ppl']:.3f} | {b['ppl']:.3f} | "
              f"{100 * (b['ppl'] / a['ppl'] - 1):+.2f} % ({100 * lo:+.2f} … {100 * hi:+.2f}) | {a['kl']:.5f} | "
              f"{b['kl']:.5f} | {100 * rel:+.1f} % ({100 * klo:+.1f} … {100 * khi:+.1f}) | "
              f"{a['build_s']:.0f} / {b['build_s']:.0f} |")


if __name__ == "__main__":
    main()
