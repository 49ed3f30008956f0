"""Time of block-output reconstruction on a GPU at a real model's widths (issue 16.1's timing).

    python bench/gpu_block_tuning.py --hidden 4096 --ffn 14336 --heads 32 --kv-heads 8 --layers 2

Random-initialised Llama decoder blocks of the given widths (timing only: with random weights
the error reductions say nothing about quality), every linear Q4_K (haloquant's own k-quant fit of
64 rows, tiled — timing only — without llama.cpp's candidate), calibration of --windows × --seq-len random tokens, AutoRound's
defaults (200 steps of 8 windows per block). Prints per block: encode seconds (numpy, CPU),
tuning seconds on the device, peak device memory, and the extrapolation to --full-layers blocks.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from haloquant.formats import get_format
from haloquant.kquants import encode_kquant
from haloquant.reconstruct import TuneSettings, tune_blocks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--full-layers", type=int, default=32)
    ap.add_argument("--windows", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, num_hidden_layers=args.layers, vocab_size=8192,
                      max_position_embeddings=args.seq_len)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float().eval()
    fmt = get_format("Q4_K")
    encoded, formats, enc_s, n_enc = {}, {}, 0.0, 0
    for name, p in model.named_parameters():
        if ".layers." in name and p.ndim == 2:  # 64 rows encoded, tiled: timing only (bytes per row are independent)
            t0 = time.perf_counter()
            rows = encode_kquant("Q4_K", p.detach()[:64].numpy()).reshape(64, -1)
            enc_s += time.perf_counter() - t0
            n_enc += 64 * p.shape[1]
            encoded[name] = np.ascontiguousarray(np.tile(rows, (p.shape[0] // 64, 1)))
            formats[name] = fmt
    weights_per_block = sum(p.numel() for n, p in model.named_parameters() if ".layers.0." in n and p.ndim == 2)
    enc_s = enc_s / n_enc * weights_per_block * args.layers  # numpy encode, extrapolated to every row
    ids = torch.randint(0, cfg.vocab_size, (args.windows, args.seq_len), generator=torch.Generator().manual_seed(0))
    torch.cuda.reset_peak_memory_stats() if args.device.startswith("cuda") else None
    log_t = [time.perf_counter()]
    times = []

    def log(msg):
        now = time.perf_counter()
        times.append(now - log_t[0])
        log_t[0] = now
        print(f"{msg} ({times[-1]:.1f} s)", flush=True)

    t0 = log_t[0] = time.perf_counter()
    _, report = tune_blocks(model, ids, encoded, formats, TuneSettings(iters=args.iters), args.device, log=log)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
    weights = sum(r["weights"] for r in report) // len(report)
    per_block = float(np.median(times[1:])) if len(times) > 1 else times[0]
    print(f"\n| widths | weights per block | calibration | encode Q4_K, 1 CPU core s/block | tuning s/block | "
          f"first block, with the input capture, s | peak GiB | {args.full_layers} blocks (min) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.hidden}/{args.ffn}, {args.heads}/{args.kv_heads} heads | {weights:,} | {args.windows} × "
          f"{args.seq_len} | {enc_s / args.layers:.0f} | {per_block:.1f} | {times[0]:.1f} | {peak:.1f} | "
          f"{args.full_layers * per_block / 60:.1f} |")


if __name__ == "__main__":
    main()
