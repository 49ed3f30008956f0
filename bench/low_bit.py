"""Issue 16's bench: haloquant at 2–4 bits against llama.cpp+imatrix at the same bytes, part by part.

    python bench/low_bit.py --model ../shared/models/ref-llama-a --chunks 100 --out /tmp/haloquant-lowbit

Sizes: llama.cpp presets (type maps from llama-quantize's dry run, so the i-quant presets are read
without an imatrix) and fixed bits per weight. Rows at each size:
- llama.cpp+imatrix: the preset's type map, every tensor quantized by ggml_quantize_chunk with the
  calibration imatrix (what llama-quantize --imatrix does per tensor);
- haloquant k-quants: the allocation over k-quants + Q8_0 (and llama.cpp's fallbacks) at the
  preset's tensor bytes, GPTQ — haloquant before the i-quants;
- + i-quants: the same with IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S among the candidates;
- + IQ1 (--iq1): the same with IQ1_S and IQ1_M too (and the corrections, with --corrections), measured by a
  second sensitivity run whose IQ1 entries join the table (over IQ1 alone, or for kl_calibrated, which
  scales every format by its tensor's Q4_K probe, over IQ1 and the k-quants, so both runs share the probe);
- + statistics correction (--corrections): that allocation with quantize's two corrections
  (correct_row_scales, correct_input_scales);
- + block tuning (--tuning-iters N > 0): that allocation with block-output tuning (and the
  corrections, with --corrections: each row adds one part to the one above);
- + end-to-end tuning (--end-to-end-iters N > 0): the row above (corrections, block tuning where asked)
  with quantize.end_to_end's N steps against the float model's next-token distributions (a GPU step:
  10–20 s a step on 2 CPU cores for a 25 M model);
- k-quants + statistics correction + block tuning (--kquant-stack): both on the k-quant row's
  allocation, where block tuning can move every decoder tensor's codes;
- AutoRound (--autoround): AutoRound 0.16.1's GGUF of the same llama.cpp preset (default 200
  iterations, same calibration text; bench/autoround_gguf.py), for the presets it writes.
One sensitivity run (kl_calibrated, GPTQ quantizer) measures every candidate; the k-quant row's
allocation sees only the k-quants' entries. Every file is scored by llama.cpp (WikiText-2 test,
ctx 512, --chunks chunks) with KL from the F16 file and a 95 % paired interval against the
size's reference row (the preset; at a fixed bpw, the k-quant row). Each file's score is cached
beside it (score.json in its folder), every built file is kept and the sensitivity runs are journalled tensor
by tensor, so an interrupted run resumes (delete the --out folder after changing the code).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
from haloquant import HaloquantError
from haloquant.artifacts import read_json, sha256_json, write_json
from haloquant.modelio import load_model, quantizable_tensors
from haloquant.presets import preset_type_map_dry, tensor_data_bytes
from haloquant.resume import journal_for
from haloquant.schemas.params import BlockTuningSpec, EndToEndSpec, SensitivitySpec
from haloquant.tasks.sensitivity import score_sensitivity
from haloquant.widening import source_weight_ratio

from autoround_gguf import autoround_gguf  # noqa: E402  (bench/ is on sys.path when run as a script)
from common import REPO, plain, setup  # noqa: E402
from kquant_presets import build, build_mixed  # noqa: E402
from paired_ppl import TOKENS_PER_CHUNK, cached_score, paired, paired_ratio  # noqa: E402
from real_models import f16_reference  # noqa: E402

PRESETS = ["IQ2_M", "Q2_K", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "Q4_K_M"]
BPW = [2.5, 3.0, 3.5]
KQUANT_CANDIDATES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]
LATTICE = ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S"]
IQ1 = ["IQ1_S", "IQ1_M"]
AUTOROUND_FORMATS = {"Q2_K": "q2_k_s", "Q3_K_S": "q3_k_s", "Q3_K_M": "q3_k_m", "Q4_K_S": "q4_k_s", "Q4_K_M": "q4_k_m"}


def measure(spec, sens_spec: SensitivitySpec, calib: Path, out: Path) -> None:
    """The sensitivity table (GPTQ quantizer) into `out`, unless it is there; journalled tensor by tensor beside
    it (haloquant/resume.py), so a run killed in this step — hours for a 0.5 B model on 2 cores — resumes there."""
    if (out / "sensitivity.json").is_file():
        return
    key = lambda: sha256_json({"model": str(spec.path), "sensitivity": sens_spec.model_dump(mode="json")})  # noqa: E731
    with journal_for(out.with_name(out.name + ".resume"), key):
        score_sensitivity(spec, sens_spec, plain(method="gptq"), calib, out)


def without(sens_dir: Path, formats: list[str], out: Path) -> Path:
    """A copy of a sensitivity folder whose tensors lose their candidates in `formats`: haloquant before them keeps
    the k-quants, Q8_0 and, on rows that are not whole 256-blocks, llama.cpp's block-32 fallbacks (Q4_0 … IQ4_NL)."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(sens_dir, out)
    table = read_json(out / "sensitivity.json")
    for t in table["tensors"]:
        t["candidates"] = {f: c for f, c in t["candidates"].items() if f not in formats}
    table["formats"] = [f for f in table["formats"] if f not in formats]
    write_json(out / "sensitivity.json", table)
    return out


def with_candidates(sens_dir: Path, extra_dir: Path, formats: list[str], out: Path) -> Path:
    """A copy of a sensitivity folder whose tensors also hold `formats`' entries from another run's table
    (same model, calibration, metric and quantizer)."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(sens_dir, out)
    table, extra = read_json(out / "sensitivity.json"), read_json(extra_dir / "sensitivity.json")
    for t, e in zip(table["tensors"], extra["tensors"], strict=True):
        assert t["name"] == e["name"]
        t["candidates"].update({f: c for f, c in e["candidates"].items() if f in formats})
    table["formats"] += [f for f in formats if f not in table["formats"]]
    write_json(out / "sensitivity.json", table)
    return out


def versus(s: dict, ref: dict) -> dict:
    """Perplexity and KL of one scored file against another on the same chunks, 95 % paired bootstrap."""
    rel, lo, hi = paired(np.array(s["chunk_nll"]), np.array(ref["chunk_nll"]), TOKENS_PER_CHUNK)
    krel, klo, khi = paired_ratio(np.array(s["chunk_kl"]), np.array(ref["chunk_kl"]))
    return {"ppl_rel": rel, "ppl_lo": lo, "ppl_hi": hi, "kl_rel": krel, "kl_lo": klo, "kl_hi": khi}


def versus_table(rows: list[dict], key: str, title: str) -> list[str]:
    """Markdown lines: each row's `key` comparison (a versus() dict), if any row has one."""
    if not any(key in r for r in rows):
        return []
    lines = ["", f"{title} (95 % paired):", "", "| size | row | Δ ppl (95 %) | Δ KL (95 %) |", "|---|---|---|---|"]
    for r in (r for r in rows if key in r):
        v = r[key]
        lines.append(f"| {r['size']} | {r['row']} | {100 * v['ppl_rel']:+.2f} % ({100 * v['ppl_lo']:+.2f} … "
                     f"{100 * v['ppl_hi']:+.2f}) | {100 * v['kl_rel']:+.1f} % ({100 * v['kl_lo']:+.1f} … "
                     f"{100 * v['kl_hi']:+.1f}) |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=REPO.parent / "shared/models/ref-llama-a")
    ap.add_argument("--chunks", type=int, default=100)
    ap.add_argument("--presets", nargs="*", default=PRESETS)
    ap.add_argument("--bpw", nargs="*", type=float, default=BPW)
    ap.add_argument("--tuning-iters", type=int, default=0, help="> 0: also a row with block tuning")
    ap.add_argument("--corrections", action="store_true",
                    help="also a row with correct_row_scales + correct_input_scales (and block tuning on top)")
    ap.add_argument("--kquant-stack", action="store_true",
                    help="with --corrections and --tuning-iters: also both on the k-quant row's allocation (block "
                         "tuning moves k-quant codes, not the lattice i-quants')")
    ap.add_argument("--end-to-end-iters", type=int, default=0,
                    help="> 0: also a row with end-to-end tuning on top of the row above it")
    ap.add_argument("--metric", default="kl_calibrated")
    ap.add_argument("--iq1", action="store_true", help="also a row with IQ1_S/IQ1_M among the candidates")
    ap.add_argument("--autoround", action="store_true", help="also AutoRound's GGUF of each preset it writes")
    ap.add_argument("--out", type=Path, default=Path("/tmp/haloquant-lowbit"))
    ap.add_argument("--only", nargs="*", default=None, help="build only these haloquant rows (e.g. '+ statistics "
                    "correction'): each row costs a GPTQ build and a scoring")
    ap.add_argument("--device", default="cpu", help="model.device of every stage (e.g. cuda on the lent GPU)")
    ap.add_argument("--build-only", action="store_true", help="build every file, score none: on the lent GPU, "
                    "whose files come back in pieces to be scored by a run here that finds them built")
    args = ap.parse_args()
    spec, calib, text = setup(args.model, args.out, device=args.device)
    infos = quantizable_tensors(load_model(spec.path, "cpu"))
    n_weights = sum(t.n_weights for t in infos)
    checkpoint_weights = n_weights * source_weight_ratio(spec.path)  # < n_weights for a widened copy

    sens = args.out / "sensitivity"
    t0 = time.perf_counter()
    measure(spec, SensitivitySpec(formats=KQUANT_CANDIDATES + LATTICE, metric=args.metric), calib, sens)
    print(f"sensitivity ({args.metric}, GPTQ quantizer, {len(KQUANT_CANDIDATES + LATTICE)} formats): "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    sens_k = without(sens, LATTICE, args.out / "sensitivity-kquants")
    if args.iq1:
        t0 = time.perf_counter()
        # kl_calibrated scales each format by its tensor's Q4_K probe, so that run repeats the k-quants;
        # the other metrics' entries stand alone
        formats = KQUANT_CANDIDATES + IQ1 if args.metric == "kl_calibrated" else IQ1
        measure(spec, SensitivitySpec(formats=formats, metric=args.metric), calib, args.out / "sensitivity-iq1-only")
        print(f"sensitivity of IQ1: {time.perf_counter() - t0:.0f} s", flush=True)
        sens_iq1 = with_candidates(sens, args.out / "sensitivity-iq1-only", IQ1, args.out / "sensitivity-iq1")

    f16 = args.out / "F16" / "gguf" / "model.gguf"
    if not f16.is_file():
        f16, _ = build(spec, infos, {t.gguf_name: "F16" for t in infos}, "rtn", calib, args.out / "F16")
    if not args.build_only:
        ref, f16_logprobs = f16_reference(f16, text, args.chunks, args.out / "f16_logprobs.npy")  # kept for a rerun
        print(f"F16: {f16.stat().st_size:,} bytes, ppl {ref['ppl']:.3f}", flush=True)

    def scored(path: Path) -> dict:
        return cached_score(path, text, args.chunks, f16_logprobs)

    infeasible: list[dict] = []

    def variants(label: str, d: Path, total: int) -> dict[str, Path]:
        files = {}
        runs = [("haloquant k-quants", sens_k, d / "kquants", None), ("+ i-quants", sens, d / "iquants", None)]
        corrections = {"correct_row_scales": True, "correct_input_scales": True} if args.corrections else {}
        if corrections:
            runs.append(("+ statistics correction", sens, d / "corrected", plain(method="gptq", **corrections)))
        if args.iq1:
            runs.append(("+ IQ1", sens_iq1, d / ("iq1-corrected" if corrections else "iq1"),
                         plain(method="gptq", **corrections)))
        if args.tuning_iters > 0:
            runs.append((f"+ block tuning ({args.tuning_iters} steps)", sens,
                         d / (f"tuned-{args.tuning_iters}" + ("-corrected" if corrections else "")),
                         plain(method="gptq", block_tuning=BlockTuningSpec(iters=args.tuning_iters),
                                      **corrections)))
        stacked = runs[-1]  # the row with every part asked for
        if args.end_to_end_iters > 0:  # on that row's allocation and parts
            _, table, below, qspec = stacked
            qspec = (qspec or plain(method="gptq")).model_copy(update={"end_to_end": EndToEndSpec(
                iters=args.end_to_end_iters)})
            runs.append((f"+ end-to-end tuning ({args.end_to_end_iters} steps)", table,
                         below.with_name(f"{below.name}-e2e-{args.end_to_end_iters}"), qspec))
        if args.kquant_stack and corrections and args.tuning_iters > 0:  # the same parts on the k-quant allocation
            runs.append((f"k-quants + statistics correction + block tuning ({args.tuning_iters} steps)", sens_k,
                         d / f"kquants-tuned-{args.tuning_iters}-corrected", stacked[3]))
        for name, table, out, qspec in runs:
            if args.only is not None and name not in args.only:
                continue
            if (out / "gguf" / "model.gguf").is_file():  # built by an earlier, interrupted run
                files[name] = out / "gguf" / "model.gguf"
                continue
            try:
                files[name] = build_mixed(spec, table, total, calib, out, qspec)
            except HaloquantError as e:  # e.g. no k-quant allocation fits under Q2_K's 2.625 bits per weight
                infeasible.append({"size": label, "row": name, "why": str(e).split(" (")[0]})
                print(f"{label} {name}: {e}", flush=True)
        return files

    rows = []
    sizes = [(p, None) for p in args.presets] + [(f"{b:g} bpw", b) for b in args.bpw]
    for label, bpw in sizes:
        d = args.out / label.replace(" ", "_")
        files: dict[str, Path] = {}
        if bpw is None:
            ref_file = d / "llama.cpp+imatrix" / "gguf" / "model.gguf"
            if not ref_file.is_file():
                ref_file, _ = build(spec, infos, preset_type_map_dry(f16, label), "llamacpp", calib,
                                    d / "llama.cpp+imatrix")
            files["llama.cpp+imatrix"] = ref_file
            total = tensor_data_bytes(ref_file)
            if args.autoround and label in AUTOROUND_FORMATS:
                files["AutoRound"], _ = autoround_gguf(spec.path, AUTOROUND_FORMATS[label], d / "autoround",
                                                       device_map="cuda" if spec.device.startswith("cuda") else "cpu",
                                                       tokenizer_of=f16)
        else:
            total = tensor_data_bytes(f16) - 2 * n_weights + int(bpw * checkpoint_weights / 8)
        files.update(variants(label, d, total))
        if args.build_only:
            for name, p in files.items():
                print(f"{label} {name}: {p} ({p.stat().st_size:,} bytes)", flush=True)
            continue
        scores = {name: scored(p) for name, p in files.items()}
        if not scores:  # every row infeasible at this size (listed below the table)
            continue
        base = next(iter(scores))
        for name, s in scores.items():
            rows.append({"size": label, "row": name, "bytes": s["bytes"], "ppl": s["ppl"], "kl": s["kl"], "vs": base,
                         **versus(s, scores[base])})
            if name != "haloquant k-quants" and "haloquant k-quants" in scores:  # what each part adds
                rows[-1]["vs_kquants"] = versus(s, scores["haloquant k-quants"])
            if name not in ("llama.cpp+imatrix", "AutoRound") and "AutoRound" in scores:  # every haloquant row
                rows[-1]["vs_autoround"] = versus(s, scores["AutoRound"])
            print(json.dumps(rows[-1]), flush=True)
    if args.build_only:
        return
    write_json(args.out / "low_bit.json", {"model": str(args.model), "chunks": args.chunks, "f16_ppl": ref["ppl"],
                                           "rows": rows, "infeasible": infeasible})
    lines = [f"{args.model.name}: llama.cpp perplexity, WikiText-2 test, ctx 512, first {args.chunks} chunks; "
             f"F16 {ref['ppl']:.3f}; KL from the F16 file; Δ vs the size's first row, 95 % paired bootstrap", "",
             "| size | row | file bytes | ppl | Δ ppl (95 %) | KL | Δ KL (95 %) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        same = r["row"] == r["vs"]
        dp = "" if same else f"{100 * r['ppl_rel']:+.2f} % ({100 * r['ppl_lo']:+.2f} … {100 * r['ppl_hi']:+.2f})"
        dk = "" if same else f"{100 * r['kl_rel']:+.1f} % ({100 * r['kl_lo']:+.1f} … {100 * r['kl_hi']:+.1f})"
        lines.append(f"| {r['size']} | {r['row']} | {r['bytes']:,} | {r['ppl']:.3f} | {dp} | {r['kl']:.5f} | {dk} |")
    lines += [f"| {r['size']} | {r['row']} | infeasible: {r['why']} | | | | |" for r in infeasible]
    lines += versus_table(rows, "vs_kquants", "Every other row against haloquant k-quants at the same size")
    lines += versus_table(rows, "vs_autoround", "haloquant's rows against AutoRound's file at the same preset")
    (args.out / "low_bit.md").write_text("\n".join(lines) + "\n")  # llama.cpp's log may interleave with stdout
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
