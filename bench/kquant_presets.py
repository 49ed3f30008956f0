"""Issue 3's bench: llama.cpp's k-quant presets vs haloquant's encoders on the *same* type map.

    python bench/kquant_presets.py --model ../shared/models/ref-llama-a --chunks 100

For each preset: llama.cpp's llama_model_quantize on an F16 GGUF gives the file and its per-tensor
type map. With that same map: llama.cpp's quantizer with an imatrix (ggml_quantize_chunk with the
calibration E[x²], what llama-quantize --imatrix calls per tensor), haloquant RTN, haloquant GPTQ.
Then haloquant's own allocation (sensitivity with the GPTQ quantizer → MILP) at exactly the
preset's tensor bytes, quantized with GPTQ ("haloquant mixed"), and one at 94 % of Q4_K_M's.
Every file is scored by llama.cpp on WikiText-2 test at context 512: perplexity, and KL from the
F16 file's token distributions (llama-perplexity --kl-divergence's measure, far less noisy at the
high-bit rows); each haloquant file's difference from llama.cpp+imatrix gets a 95 % paired-bootstrap
interval over the chunks.
Then: per-tensor weighted error of haloquant RTN vs llama.cpp's quantizer, and encode speed on a
4096×4096 matrix, and GPTQ time for the whole model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from haloquant.artifacts import write_json
from haloquant.calibstats import CalibrationStats
from haloquant.formats import get_format
from haloquant.llamacpp import ggml_quantize, llama_cpp_perplexity
from haloquant.modelio import load_model, quantizable_tensors
from haloquant.presets import allocation_from_type_map, preset_type_map, tensor_data_bytes
from haloquant.schemas.params import (AllocationSpec, FoldSpec, GGUFSpec, QuantizeSpec,
                            SensitivitySpec)
from haloquant.tasks.allocate import allocate
from haloquant.tasks.export_gguf import export_gguf
from haloquant.tasks.quantize import quantize
from haloquant.tasks.scale_fold import scale_fold

from common import REPO, plain, setup  # noqa: E402  (bench/ is on sys.path when run as a script)
from paired_ppl import TOKENS_PER_CHUNK, paired, paired_ratio  # noqa: E402
PRESETS = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K"]
KQUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
CODECS = KQUANTS + ["IQ4_NL", "IQ4_XS"]  # haloquant's own encoders, compared with llama.cpp's


def codec_errors(formats: list[str], infos, params, stats) -> list[dict]:
    """Per-tensor weighted error Σ imp·(w−q)² of haloquant's encoder over llama.cpp's quantizer on
    the model's real tensors, with the calibration imatrix and without (geometric means)."""
    rows = []
    for name in formats:
        fmt = get_format(name)
        ratios, ratios_plain = [], []
        for t in infos:
            w = params[t.name].detach().float().numpy()
            imp = stats.importance(t)
            e = lambda q: float((((q - w) ** 2) * imp).sum())  # noqa: E731
            ratios.append(e(fmt.roundtrip(w, imp)) / e(fmt.decode(ggml_quantize(fmt, w, imp), w.shape)))
            e2 = lambda q: float(((q - w) ** 2).sum())  # noqa: E731
            ratios_plain.append(e2(fmt.roundtrip(w)) / e2(fmt.decode(ggml_quantize(fmt, w), w.shape)))
        rows.append({"format": name, "imatrix_geomean_ratio": float(np.exp(np.mean(np.log(ratios)))),
                     "imatrix_frac_ours_le": float(np.mean(np.array(ratios) <= 1)),
                     "plain_geomean_ratio": float(np.exp(np.mean(np.log(ratios_plain)))),
                     "plain_frac_ours_le": float(np.mean(np.array(ratios_plain) <= 1))})
    return rows


def encode_speed(formats: list[str], n: int) -> list[dict]:
    """Seconds to encode an n×n float32 matrix, haloquant vs llama.cpp's quantizer (one thread each)."""
    x = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    imp = np.random.default_rng(1).lognormal(0, 1, n).astype(np.float32)
    rows = []
    for name in formats:
        fmt = get_format(name)
        weighted = imp if fmt.is_kquant or fmt.code_values is not None else None
        t0 = time.perf_counter(); fmt.encode(x, weighted, threads=1); t1 = time.perf_counter()  # noqa: E702
        ggml_quantize(fmt, x, weighted); t2 = time.perf_counter()  # noqa: E702
        fmt.encode(x, weighted); t3 = time.perf_counter()  # noqa: E702  — on every thread
        rows.append({"format": name, "haloquant_s": t1 - t0, "llama.cpp_s": t2 - t1, "ratio": (t1 - t0) / (t2 - t1),
                     "haloquant_all_threads_s": t3 - t2})
    return rows


def print_codec_tables(err_rows: list[dict], speed: list[dict], n: int) -> None:
    print("\nPer-tensor weighted error Σ imp·(w−q)², haloquant RTN / llama.cpp (geometric mean over tensors):")
    print("| format | with imatrix | tensors where ours ≤ | no imatrix (unweighted) | tensors where ours ≤ |")
    print("|---|---|---|---|---|")
    for r in err_rows:
        print(f"| {r['format']} | {r['imatrix_geomean_ratio']:.3f} | {100 * r['imatrix_frac_ours_le']:.0f} % | "
              f"{r['plain_geomean_ratio']:.3f} | {100 * r['plain_frac_ours_le']:.0f} % |")
    print(f"\nEncode time of a {n}×{n} float32 matrix (one thread each; then haloquant on every thread, rows split):")
    print("| format | haloquant (s) | llama.cpp (s) | ratio | haloquant, all threads (s) |")
    print("|---|---|---|---|---|")
    for r in speed:
        print(f"| {r['format']} | {r['haloquant_s']:.2f} | {r['llama.cpp_s']:.2f} | {r['ratio']:.1f}× | "
              f"{r.get('haloquant_all_threads_s', float('nan')):.2f} |")


def build(model_spec, infos, type_map, method: str | QuantizeSpec, calib_dir, out) -> tuple[Path, float]:
    """allocation from a type map → quantize(method or spec) → GGUF; returns the file and quantize seconds."""
    write_json(out / "allocate/allocation.json", allocation_from_type_map(infos, type_map, "type map").model_dump())
    scale_fold(model_spec, FoldSpec(), calib_dir, out / "allocate", out / "scale_fold")
    t0 = time.perf_counter()
    spec = method if isinstance(method, QuantizeSpec) else plain(method=method)
    quantize(model_spec, spec, calib_dir, out / "allocate", out / "scale_fold", out / "quantize")
    secs = time.perf_counter() - t0
    export_gguf(model_spec, GGUFSpec(), out / "quantize", out / "gguf")
    return out / "gguf" / "model.gguf", secs


def build_mixed(model_spec, sens_dir, total_bytes, calib_dir, out, qspec: QuantizeSpec | None = None) -> Path:
    """haloquant's own allocation at `total_bytes` of tensor data, quantized with GPTQ (or `qspec`)."""
    allocate(AllocationSpec(budget={"total_bytes": total_bytes}), sens_dir, out / "allocate")
    scale_fold(model_spec, FoldSpec(), calib_dir, out / "allocate", out / "scale_fold")
    quantize(model_spec, qspec or plain(method="gptq"), calib_dir, out / "allocate", out / "scale_fold",
             out / "quantize")
    export_gguf(model_spec, GGUFSpec(), out / "quantize", out / "gguf")
    return out / "gguf" / "model.gguf"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=REPO.parent / "shared/models/ref-llama-a")
    ap.add_argument("--chunks", type=int, default=100)
    ap.add_argument("--presets", nargs="+", default=PRESETS)
    ap.add_argument("--out", type=Path, default=Path("/tmp/haloquant-kquants"))
    ap.add_argument("--speed-size", type=int, default=4096)
    ap.add_argument("--metric", default="kl_calibrated", help="sensitivity metric for haloquant mixed")
    ap.add_argument("--codecs-only", nargs="+", metavar="FORMAT",
                    help="only the weighted-error and encode-speed tables, for these formats")
    args = ap.parse_args()
    spec, calib_dir, text = setup(args.model, args.out)
    stats = CalibrationStats(calib_dir)
    model = load_model(spec.path, "cpu")
    infos = quantizable_tensors(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    if args.codecs_only:
        print_codec_tables(codec_errors(args.codecs_only, infos, params, stats),
                           encode_speed(args.codecs_only, args.speed_size), args.speed_size)
        return

    chunk_nll: dict[str, list[float]] = {}  # "preset/label" → per-chunk NLL, for paired intervals
    chunk_kl: dict[str, list[float]] = {}  # "preset/label" → per-chunk summed KL from the F16 file
    kl: dict[str, float] = {}
    f16_logprobs = None

    def ppl(path: Path, key: str | None = None) -> float:
        r = llama_cpp_perplexity(path, text, 512, args.chunks, reference=f16_logprobs)
        if key is not None:
            chunk_nll[key], chunk_kl[key], kl[key] = r["chunk_nll"], r["chunk_kl"], r["kl"]
        return r["ppl"]

    def interval(preset: str, label: str) -> str:
        """95 % paired-bootstrap interval of label vs llama.cpp+imatrix over the same chunks."""
        _, lo, hi = paired(np.array(chunk_nll[f"{preset}/{label}"]), np.array(chunk_nll[f"{preset}/llama.cpp+imatrix"]),
                           TOKENS_PER_CHUNK)
        return f"{100 * lo:+.2f} … {100 * hi:+.2f} %"

    def kl_cells(preset: str, label: str) -> str:
        """KL of label, its ratio to llama.cpp+imatrix's and that ratio's 95 % paired interval."""
        rel, lo, hi = paired_ratio(np.array(chunk_kl[f"{preset}/{label}"]), np.array(chunk_kl[f"{preset}/llama.cpp+imatrix"]))
        return f"{kl[f'{preset}/{label}']:.5f} | {100 * rel:+.1f} % ({100 * lo:+.1f} … {100 * hi:+.1f})"

    sens_dir = args.out / "sensitivity"
    t0 = time.perf_counter()
    if not (sens_dir / "sensitivity.json").is_file():
        from haloquant.tasks.sensitivity import score_sensitivity

        score_sensitivity(spec, SensitivitySpec(formats=KQUANTS + ["Q8_0"], metric=args.metric),
                          plain(method="gptq"), calib_dir, sens_dir)
    print(f"sensitivity ({args.metric}, GPTQ quantizer): {time.perf_counter() - t0:.1f} s", flush=True)
    f16, _ = build(spec, infos, {t.gguf_name: "F16" for t in infos}, "rtn", calib_dir, args.out / "F16")
    r = llama_cpp_perplexity(f16, text, 512, args.chunks, keep_logprobs=True)
    f16_logprobs = r.pop("logprobs")
    rows = [{"preset": "F16", "bytes": f16.stat().st_size, "llama.cpp": r["ppl"]}]
    print(f"F16: {rows[0]}", flush=True)
    gptq_seconds = {}
    for preset in args.presets:
        d = args.out / preset
        d.mkdir(parents=True, exist_ok=True)
        ref = d / "llama.cpp.gguf"
        type_map = preset_type_map(f16, preset, ref)
        row = {"preset": preset, "bytes": ref.stat().st_size, "llama.cpp": ppl(ref, f"{preset}/llama.cpp"),
               "types": dict(sorted({v: list(type_map.values()).count(v) for v in set(type_map.values())}.items()))}
        for label, method in (("llama.cpp+imatrix", "llamacpp"), ("haloquant RTN", "rtn"), ("haloquant GPTQ", "gptq")):
            path, secs = build(spec, infos, type_map, method, calib_dir, d / method)
            row[label] = ppl(path, f"{preset}/{label}")
            row[f"{label} bytes"] = path.stat().st_size
            if method == "gptq":
                gptq_seconds[preset] = secs
        mixed = build_mixed(spec, sens_dir, tensor_data_bytes(ref), calib_dir, d / "mixed")
        row["haloquant mixed"] = ppl(mixed, f"{preset}/haloquant mixed")
        row["haloquant mixed bytes"] = mixed.stat().st_size
        rows.append(row)
        print(json.dumps(row | {"kl": {k: v for k, v in kl.items() if k.startswith(preset + "/")}}), flush=True)

    q4km = next((r for r in rows if r["preset"] == "Q4_K_M"), None)
    small = None
    if q4km is not None:
        path = build_mixed(spec, sens_dir, int(0.94 * tensor_data_bytes(args.out / "Q4_K_M" / "llama.cpp.gguf")), calib_dir,
                           args.out / "mixed-94pct-Q4_K_M")
        small = {"bytes": path.stat().st_size, "ppl": ppl(path)}

    err_rows = codec_errors(CODECS, infos, params, stats)
    n = args.speed_size
    speed = encode_speed(CODECS + ["Q4_0", "Q8_0"], n)

    (args.out / "results.json").write_text(json.dumps({"ppl": rows, "errors": err_rows, "speed": speed,
                                                       "gptq_seconds": gptq_seconds, "small": small,
                                                       "kl": kl, "chunk_nll": chunk_nll, "chunk_kl": chunk_kl},
                                                      indent=2))
    print(f"\n{args.model.name}: llama.cpp perplexity, WikiText-2 test, ctx 512, first {args.chunks} chunks\n")
    print("| preset | llama.cpp bytes | llama.cpp | llama.cpp+imatrix | haloquant RTN | haloquant GPTQ | GPTQ vs +imatrix "
          "| 95 % interval (paired over chunks) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| F16 | {rows[0]['bytes']:,} | {rows[0]['llama.cpp']:.3f} | | | | | |")
    for r in rows[1:]:
        print(f"| {r['preset']} | {r['bytes']:,} | {r['llama.cpp']:.3f} | {r['llama.cpp+imatrix']:.3f} | "
              f"{r['haloquant RTN']:.3f} | {r['haloquant GPTQ']:.3f} | "
              f"{100 * (r['haloquant GPTQ'] / r['llama.cpp+imatrix'] - 1):+.2f} % | "
              f"{interval(r['preset'], 'haloquant GPTQ')} |")
    print("\nKL from the F16 file's distribution (nats per token, same positions), and vs llama.cpp+imatrix "
          "with its 95 % paired interval:\n")
    print("| preset | llama.cpp | llama.cpp+imatrix | haloquant RTN | vs +imatrix | haloquant GPTQ | vs +imatrix |")
    print("|---|---|---|---|---|---|---|")
    for r in rows[1:]:
        p = r["preset"]
        print(f"| {p} | {kl[p + '/llama.cpp']:.5f} | {kl[p + '/llama.cpp+imatrix']:.5f} | {kl_cells(p, 'haloquant RTN')} | "
              f"{kl_cells(p, 'haloquant GPTQ')} |")
    print("\nhaloquant's own allocation (sensitivity with GPTQ → MILP → GPTQ) at the same tensor bytes:")
    print("| preset | llama.cpp+imatrix bytes | llama.cpp+imatrix | haloquant mixed bytes | haloquant mixed | vs +imatrix "
          "| 95 % interval | KL | KL vs +imatrix |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows[1:]:
        print(f"| {r['preset']} | {r['llama.cpp+imatrix bytes']:,} | {r['llama.cpp+imatrix']:.3f} | "
              f"{r['haloquant mixed bytes']:,} | {r['haloquant mixed']:.3f} | "
              f"{100 * (r['haloquant mixed'] / r['llama.cpp+imatrix'] - 1):+.2f} % | "
              f"{interval(r['preset'], 'haloquant mixed')} | {kl_cells(r['preset'], 'haloquant mixed')} |")
    if small is not None:
        print(f"\n94 % of Q4_K_M's tensor bytes: haloquant mixed {small['bytes']:,} bytes "
              f"({100 * small['bytes'] / q4km['bytes']:.1f} % of Q4_K_M's file), ppl {small['ppl']:.3f} "
              f"vs Q4_K_M {q4km['llama.cpp']:.3f} (llama.cpp) / {q4km['llama.cpp+imatrix']:.3f} (+imatrix)")
    print("\nSame type map ⇒ same tensor bytes: haloquant files differ from llama.cpp's only in metadata "
          f"({', '.join(str(r['haloquant GPTQ bytes'] - r['bytes']) for r in rows[1:])} bytes).")
    print_codec_tables(err_rows, speed, n)
    print("\nGPTQ time, whole model, CPU (s): " + ", ".join(f"{k} {v:.1f}" for k, v in gptq_seconds.items()))


if __name__ == "__main__":
    main()
