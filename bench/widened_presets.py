"""A widened checkpoint (haloquant/widening.py) at llama.cpp's presets, against the checkpoint's own files.

    python bench/widened_presets.py --model /work/models/real/qwen2.5-coder-0.5b --widened WIDENED_DIR \
        --reference /work/runs/qwen-real --presets Q3_K_M --out /work/runs/widen-qwen/presets

At a width that is not whole 256-blocks llama.cpp's presets fall back to block-32 formats for most
tensors, so its "Q3_K_M" of such a model is a ~5-bit file. On the widened copy the same preset is what
its name says. Rows per preset, every file scored by llama.cpp (WikiText-2 test, ctx 512, --chunks
chunks) with KL from the *checkpoint's* F16 file (the widened model computes the same function):
- llama.cpp+imatrix of the widened copy (the preset's type map, ggml's quantizer with the calibration imatrix);
- haloquant on that type map (GPTQ, --corrections: both statistics corrections), so the same bytes;
- for reference, the checkpoint's own llama.cpp+imatrix file at that preset, read from bench/real_models.py's
  --reference folder (PRESET/llamacpp/gguf/model.gguf and its cached score), and its F16 log-probs.
Paired 95 % intervals against the checkpoint's preset file. Files and scores are kept: a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from haloquant.modelio import load_model, quantizable_tensors
from haloquant.presets import preset_type_map_dry

from common import plain, setup  # noqa: E402  (bench/ is on sys.path when run as a script)
from kquant_presets import build  # noqa: E402
from low_bit import versus  # noqa: E402
from paired_ppl import cached_score  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widened", type=Path, required=True, help="the widened copy (haloquant widen / rotate.widen)")
    ap.add_argument("--reference", type=Path, required=True, help="bench/real_models.py's --out for the checkpoint")
    ap.add_argument("--presets", nargs="+", default=["Q3_K_M"])
    ap.add_argument("--chunks", type=int, default=100)
    ap.add_argument("--corrections", action="store_true")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    spec, calib, text = setup(args.widened, args.out)
    infos = quantizable_tensors(load_model(spec.path, "cpu"))
    f16_logprobs = np.load(args.reference / "f16_logprobs.npy", mmap_mode="r")
    f16_ppl = json.loads((args.reference / "f16_logprobs.json").read_text())["ppl"]
    f16 = args.out / "F16" / "gguf" / "model.gguf"
    if not f16.is_file():
        f16, _ = build(spec, infos, {t.gguf_name: "F16" for t in infos}, "rtn", calib, args.out / "F16")
    qspec = plain(method="gptq", **({"correct_row_scales": True, "correct_input_scales": True}
                                    if args.corrections else {}))
    rows = []
    for preset in args.presets:
        d = args.out / preset
        ref_file = args.reference / preset / "llamacpp" / "gguf" / "model.gguf"
        ref_cache = ref_file.with_name(f"model.score-{args.chunks}.json")
        ref = json.loads(ref_cache.read_text()) if ref_cache.is_file() else cached_score(ref_file, text, args.chunks,
                                                                                         f16_logprobs)
        type_map = preset_type_map_dry(f16, preset)
        files = {}
        for name, method in (("widened llama.cpp+imatrix", "llamacpp"), ("widened haloquant", qspec)):
            out = d / ("llamacpp" if method == "llamacpp" else "haloquant")
            files[name] = out / "gguf" / "model.gguf" if (out / "gguf" / "model.gguf").is_file() else \
                build(spec, infos, type_map, method, calib, out)[0]
        types = dict(sorted({v: list(type_map.values()).count(v) for v in set(type_map.values())}.items()))
        rows.append({"preset": preset, "name": "checkpoint llama.cpp+imatrix", "bytes": ref["bytes"], "ppl": ref["ppl"],
                     "kl": ref["kl"]})
        for name, path in files.items():
            s = cached_score(path, text, args.chunks, f16_logprobs)
            rows.append({"preset": preset, "name": name, "bytes": s["bytes"], "ppl": s["ppl"], "kl": s["kl"],
                         "types": types, **versus(s, ref)})
            print(json.dumps(rows[-1]), flush=True)
    (args.out / "widened_presets.json").write_text(json.dumps({"f16_ppl": f16_ppl, "rows": rows}, indent=1))
    print(f"\nllama.cpp perplexity, WikiText-2 test, ctx 512, first {args.chunks} chunks; KL from the checkpoint's "
          f"F16 file ({f16_ppl:.3f}); Δ against the checkpoint's own preset file, 95 % paired\n")
    print("| preset | file | bytes | ppl | Δ ppl (95 %) | KL | Δ KL (95 %) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        dp = f"{100 * r['ppl_rel']:+.2f} % ({100 * r['ppl_lo']:+.2f} … {100 * r['ppl_hi']:+.2f})" if "ppl_rel" in r else ""
        dk = f"{100 * r['kl_rel']:+.1f} % ({100 * r['kl_lo']:+.1f} … {100 * r['kl_hi']:+.1f})" if "kl_rel" in r else ""
        print(f"| {r['preset']} | {r['name']} | {r['bytes']:,} | {r['ppl']:.3f} | {dp} | {r['kl']:.5f} | {dk} |")


if __name__ == "__main__":
    main()
