"""Issue 14: does the sensitivity stage need llama.cpp's per-block candidate? (`sensitivity.llama_cpp_candidate`)

    python bench/sensitivity_candidate.py --model ../shared/models/ref-llama-a --chunks 100

With it the table prices each format as quantize writes it (per block the better of haloquant's fit
and llama.cpp's); without it haloquant's fit alone, which on a GPU halves the stage (llama.cpp's
blocks are made on the host's cores while the device fits). The quantize stage keeps the candidate
either way, so only the allocation can differ. For each budget: the stage's seconds, how many
tensors the two allocations put in different formats, and where they differ, both files scored by
llama.cpp (perplexity with a 95 % paired interval, KL from the F16 file).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from haloquant.llamacpp import llama_cpp_perplexity
from haloquant.schemas.params import AllocationSpec, QuantizeSpec, SensitivitySpec
from haloquant.tasks.allocate import allocate
from haloquant.tasks.sensitivity import score_sensitivity

from common import build_and_score, setup  # noqa: E402  (bench/ is on sys.path when run as a script)
from paired_ppl import TOKENS_PER_CHUNK, paired, paired_ratio  # noqa: E402

FORMATS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]  # params.yaml's sensitivity.formats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--chunks", type=int, default=100)
    ap.add_argument("--bpw", type=float, nargs="+", default=[3.0, 3.5, 4.5])
    ap.add_argument("--out", type=Path, default=Path("/tmp/haloquant-sens-candidate"))
    args = ap.parse_args()
    spec, calib, text = setup(args.model, args.out)
    seconds, sens = {}, {}
    for on in (True, False):
        sens[on] = args.out / f"sensitivity-{'with' if on else 'without'}"
        t0 = time.perf_counter()
        table = score_sensitivity(spec, SensitivitySpec(formats=FORMATS, llama_cpp_candidate=on), QuantizeSpec(),
                                  calib, sens[on])
        seconds[on] = time.perf_counter() - t0
        metric = table.metric
    print(f"{args.model.name}: sensitivity ({metric}, RTN quantizer) with llama.cpp's candidate {seconds[True]:.1f} s, "
          f"without {seconds[False]:.1f} s (this CPU)\n")

    ref = None
    print("| bits per weight | tensors in other formats | bytes with / without | ppl with | ppl without | "
          "without vs with (95 %) | KL with | KL without | KL without vs with (95 %) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for bpw in args.bpw:
        allocs = {}
        for on in (True, False):
            d = args.out / f"{bpw}-{on}"
            allocs[on] = {a.gguf_name: a.format for a in
                          allocate(AllocationSpec(budget={"bits_per_weight": bpw}), sens[on], d / "allocate").tensors}
        differ = sum(allocs[True][k] != allocs[False][k] for k in allocs[True])
        if differ == 0:
            print(f"| {bpw} | 0 of {len(allocs[True])} | the same file | | | | | | |", flush=True)
            continue
        if ref is None:
            ref = _f16_logprobs(spec, calib, args.out, text, args.chunks)
        res = {}
        for on in (True, False):
            d = args.out / f"{bpw}-{on}"
            size, _ = build_and_score(spec, calib, d / "allocate", d, text, 1)
            res[on] = (size, llama_cpp_perplexity(d / "gguf" / "model.gguf", text, 512, args.chunks, reference=ref))
        (bw, rw), (bo, ro) = res[True], res[False]
        d, lo, hi = paired(np.array(ro["chunk_nll"]), np.array(rw["chunk_nll"]), TOKENS_PER_CHUNK)
        k, klo, khi = paired_ratio(np.array(ro["chunk_kl"]), np.array(rw["chunk_kl"]))
        print(f"| {bpw} | {differ} of {len(allocs[True])} | {bw:,} / {bo:,} | {rw['ppl']:.3f} | {ro['ppl']:.3f} | "
              f"{d:+.2%} ({lo:+.2%} … {hi:+.2%}) | {rw['kl']:.4f} | {ro['kl']:.4f} | {k:+.1%} ({klo:+.1%} … {khi:+.1%}) |",
              flush=True)


def _f16_logprobs(spec, calib, out: Path, text: str, chunks: int):
    """The F16 file's token log-probabilities: the reference of every KL."""
    from haloquant.modelio import load_model, quantizable_tensors
    from kquant_presets import build  # noqa: E402

    infos = quantizable_tensors(load_model(spec.path, "cpu"))
    f16, _ = build(spec, infos, {t.gguf_name: "F16" for t in infos}, "rtn", calib, out / "F16")
    return llama_cpp_perplexity(f16, text, 512, chunks, keep_logprobs=True)["logprobs"]


if __name__ == "__main__":
    main()
