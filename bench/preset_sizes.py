"""Issue 4's bench: haloquant's measured allocation at the file size of each llama.cpp preset.

    python bench/preset_sizes.py --model ../shared/models/ref-llama-a --chunks 200
    python bench/preset_sizes.py --model data/models/ref-llama-tiny --chunks 200

For each preset: llama.cpp's per-tensor type map and size (llama_model_quantize on the F16 GGUF),
the same map quantized by llama.cpp's quantizer with the calibration imatrix (llama.cpp+imatrix),
and haloquant's own allocation at exactly the preset's tensor bytes (kl_calibrated sensitivity with
the GPTQ quantizer → MILP → GPTQ); then haloquant at 94 % of Q4_K_M's tensor bytes. Every file is
scored by llama.cpp's perplexity on WikiText-2 test at ctx 512. Scores are cached per file
(score.json beside it), so an interrupted run resumes. bench/kquant_presets.py (issue 3) adds the
same-type-map RTN/GPTQ columns, error and speed tables.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from haloquant.artifacts import read_json, write_json
from haloquant.llamacpp import llama_cpp_perplexity
from haloquant.modelio import load_model, quantizable_tensors
from haloquant.presets import preset_type_map, tensor_data_bytes
from haloquant.schemas.params import QuantizeSpec, SensitivitySpec
from haloquant.tasks.sensitivity import score_sensitivity

from common import REPO, setup  # noqa: E402  (bench/ is on sys.path when run as a script)
from kquant_presets import KQUANTS, build, build_mixed  # noqa: E402
PRESETS = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=REPO.parent / "shared/models/ref-llama-a")
    ap.add_argument("--chunks", type=int, default=200)
    ap.add_argument("--presets", nargs="+", default=PRESETS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or Path(f"/tmp/haloquant-presets-{args.model.name}")
    spec, calib, text = setup(args.model, out)
    infos = quantizable_tensors(load_model(spec.path, "cpu"))

    def score(path: Path) -> float:
        cache = path.with_name("score.json")
        key = {"file_bytes": path.stat().st_size, "mtime": path.stat().st_mtime, "chunks": args.chunks}
        if cache.is_file() and read_json(cache)["key"] == key:
            return read_json(cache)["ppl"]
        ppl = llama_cpp_perplexity(path, text, 512, args.chunks)["ppl"]
        write_json(cache, {"key": key, "ppl": ppl})
        return ppl

    sens = out / "sensitivity"
    if not (sens / "sensitivity.json").is_file():
        t0 = time.perf_counter()
        score_sensitivity(spec, SensitivitySpec(formats=KQUANTS + ["Q8_0"]), QuantizeSpec(method="gptq"), calib, sens)
        print(f"sensitivity (kl_calibrated, GPTQ quantizer): {time.perf_counter() - t0:.0f} s", flush=True)
    f16 = out / "F16" / "gguf" / "model.gguf"
    if not f16.is_file():
        build(spec, infos, {t.gguf_name: "F16" for t in infos}, "rtn", calib, out / "F16")
    rows = [{"preset": "F16", "bytes": f16.stat().st_size, "ppl": score(f16)}]
    for preset in args.presets:
        d = out / preset
        d.mkdir(parents=True, exist_ok=True)
        ref = d / "llama.cpp" / "model.gguf"
        ref.parent.mkdir(exist_ok=True)
        type_map = preset_type_map(f16, preset, ref)
        imat = d / "llamacpp" / "gguf" / "model.gguf"
        if not imat.is_file():
            build(spec, infos, type_map, "llamacpp", calib, d / "llamacpp")
        mixed = d / "mixed" / "gguf" / "model.gguf"
        if not mixed.is_file():
            build_mixed(spec, sens, tensor_data_bytes(ref), calib, d / "mixed")
        rows.append({"preset": preset, "imatrix_bytes": imat.stat().st_size, "imatrix_ppl": score(imat),
                     "mixed_bytes": mixed.stat().st_size, "mixed_ppl": score(mixed)})
        print(json.dumps(rows[-1]), flush=True)
    small = None
    if "Q4_K_M" in args.presets:
        ref = out / "Q4_K_M" / "llama.cpp" / "model.gguf"
        path = out / "mixed-94pct-Q4_K_M" / "gguf" / "model.gguf"
        if not path.is_file():
            build_mixed(spec, sens, int(0.94 * tensor_data_bytes(ref)), calib, out / "mixed-94pct-Q4_K_M")
        small = {"bytes": path.stat().st_size, "ppl": score(path), "q4km_bytes": ref.stat().st_size}
    (out / "results.json").write_text(json.dumps({"rows": rows, "small": small}, indent=2))

    print(f"\n{args.model.name}: llama.cpp perplexity, WikiText-2 test, ctx 512, first {args.chunks} chunks "
          f"(F16: {rows[0]['ppl']:.3f}, {rows[0]['bytes']:,} bytes)\n")
    print("| preset | llama.cpp+imatrix bytes | llama.cpp+imatrix ppl | haloquant bytes | haloquant ppl | vs +imatrix |")
    print("|---|---|---|---|---|---|")
    for r in rows[1:]:
        print(f"| {r['preset']} | {r['imatrix_bytes']:,} | {r['imatrix_ppl']:.3f} | {r['mixed_bytes']:,} | "
              f"{r['mixed_ppl']:.3f} | {100 * (r['mixed_ppl'] / r['imatrix_ppl'] - 1):+.2f} % |")
    if small is not None:
        q4 = next(r for r in rows if r["preset"] == "Q4_K_M")
        print(f"\n94 % of Q4_K_M's tensor bytes: haloquant {small['bytes']:,} bytes "
              f"({100 * small['bytes'] / small['q4km_bytes']:.1f} % of Q4_K_M's file), ppl {small['ppl']:.3f} "
              f"vs Q4_K_M+imatrix {q4['imatrix_ppl']:.3f}")


if __name__ == "__main__":
    main()
