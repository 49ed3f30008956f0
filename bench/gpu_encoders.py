"""GPU encoders (issue 14, point 3): haloquant's block fits in torch on CUDA against numpy on the
CPU, at Llama-3-8B's widths — time per decoder block's weights and byte identity.

    python bench/gpu_encoders.py                      # on the lent GPU; on a CPU machine, torch CPU
    python bench/gpu_encoders.py --hidden 1024 --ffn 3584 --formats Q4_K   # smaller, any machine

Random weights (Student-t, heavy tails as trained weights have) of one decoder block's seven
linears at the given widths, a random positive importance per input column (as an imatrix). For
each format: haloquant's own fit (`QuantFormat.encode_own`: no llama.cpp candidate, which needs
llama-cpp-python and runs on the CPU) in numpy on one core, in numpy on every core (row chunks),
and in torch on the device; the bytes must be identical. Then GPTQ of the largest tensor with its
block fits on the CPU (as before) and on the device.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import numpy as np
import torch

import haloquant.gptq as gptq_module
from haloquant.formats import get_format
from haloquant.gptq import gptq_quantize


def block_weights(hidden: int, ffn: int, heads: int, kv_heads: int, rng) -> dict[str, np.ndarray]:
    hd = hidden // heads
    shapes = {"q": (hidden, hidden), "k": (kv_heads * hd, hidden), "v": (kv_heads * hd, hidden),
              "o": (hidden, hidden), "gate": (ffn, hidden), "up": (ffn, hidden), "down": (hidden, ffn)}
    return {n: (rng.standard_t(5, s) * 0.02).astype(np.float32) for n, s in shapes.items()}


def timed(f):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = f()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--formats", nargs="+", default=["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS",
                                                     "IQ4_NL", "Q4_1", "Q5_0"])
    ap.add_argument("--one-core-rows", type=int, default=2048,
                    help="rows of each tensor timed on one numpy core (scaled up to the tensor)")
    ap.add_argument("--gptq-format", default="Q4_K")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cores = os.cpu_count()
    rng = np.random.default_rng(0)
    ws = block_weights(args.hidden, args.ffn, args.heads, args.kv_heads, rng)
    n = sum(w.size for w in ws.values())
    imps = {k: rng.gamma(1.0, size=w.shape[1]).astype(np.float32) for k, w in ws.items()}
    name = torch.cuda.get_device_name() if device == "cuda" else "torch CPU"
    print(f"one block: {args.hidden}/{args.ffn}, {args.heads}/{args.kv_heads} heads, {n:,} weights; "
          f"device {name}; {cores} CPU cores; torch {torch.__version__}\n", flush=True)
    print(f"| format | numpy, 1 core s/block (from {args.one_core_rows} rows per tensor) | numpy, {cores} cores s/block "
          f"| torch on {device} s/block | speed-up vs {cores} cores | bytes identical |")
    print("|---|---|---|---|---|---|")
    for fname in args.formats:
        fmt = get_format(fname)
        one = many = dev = 0.0
        same = True
        fmt.encode_own(ws["k"][:256], imps["k"], device=device)  # warm-up (CUDA context, kernels)
        for k, w in ws.items():
            sub = w[: args.one_core_rows]
            _, t1 = timed(lambda: fmt.encode_own(sub, imps[k], threads=1))
            one += t1 * w.shape[0] / sub.shape[0]
            ref, tm = timed(lambda: fmt.encode_own(w, imps[k], threads=cores))
            many += tm
            got, td = timed(lambda: fmt.encode_own(w, imps[k], device=device))
            dev += td
            same &= bool(np.array_equal(ref, got))
        print(f"| {fname} | {one:.1f} | {many:.2f} | {dev:.2f} | ×{many / dev:.1f} | {'yes' if same else 'NO'} |",
              flush=True)

    big = max(ws, key=lambda k: ws[k].size)
    w = ws[big]
    x = torch.tensor(rng.standard_normal((4096, w.shape[1])), dtype=torch.float32, device=device)
    gram = (x.T @ x / x.shape[0]).double()
    fmt = get_format(args.gptq_format)
    try:
        import llama_cpp  # noqa: F401
        note = "each block also tried with llama.cpp's quantizer (on the CPU)"
    except ImportError:
        fmt = dataclasses.replace(fmt, llama_cpp_candidate=False)
        note = "llama-cpp-python absent: haloquant's own block fits only"
    print(f"\nGPTQ {args.gptq_format} of `{big}` {w.shape} on {device} ({note}):")
    real = gptq_module.fit_device
    results = {}
    for label, fd in (("block fits in numpy (CPU)", lambda d: None), (f"block fits in torch on {device}", real)):
        gptq_module.fit_device = fd
        results[label], t = timed(lambda: gptq_quantize(w, fmt, gram, device=device))
        print(f"- {label}: {t:.1f} s", flush=True)
    gptq_module.fit_device = real
    a, b = results.values()
    print(f"- bytes identical: {np.array_equal(a, b)} ({(a != b).mean() * 100:.4f} % of bytes differ)")


if __name__ == "__main__":
    main()
