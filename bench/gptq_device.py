"""GPTQ on CUDA vs CPU: correctness of the CUDA path and time for a whole model.

    python bench/gptq_device.py --model ../shared/models/ref-llama-a --format Q4_K

Calibrates on CPU or CUDA, then GPTQ-quantizes every linear weight of the model with the given
format on each available device; prints per-device time and the summed calibration output error
(vs RTN on the same grid), and checks that CUDA and CPU results are both valid llama.cpp blocks
of equal quality.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from gguf import quants as gq

from haloquant.calibstats import CalibrationStats
from haloquant.formats import get_format
from haloquant.gptq import gptq_quantize
from haloquant.modelio import load_model, quantizable_tensors
from haloquant.schemas.params import CalibrationSpec, ModelSpec
from haloquant.tasks.calibrate import calibrate

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=REPO.parent / "shared/models/ref-llama-a")
    ap.add_argument("--format", default="Q4_K")
    ap.add_argument("--out", type=Path, default=Path("/tmp/haloquant-gptq-device"))
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    calibrate(ModelSpec(path=args.model, device=dev),
              CalibrationSpec(text=REPO / "data/wikitext-2-raw/wiki.valid.raw", n_sequences=64, seq_len=256),
              args.out / "calibrate")
    print(f"calibrate on {dev}: {time.perf_counter() - t0:.1f} s", flush=True)
    model = load_model(args.model, "cpu")
    stats = CalibrationStats(args.out / "calibrate", model=model)
    params = dict(model.named_parameters(remove_duplicate=False))
    fmt = get_format(args.format)
    tensors = [t for t in quantizable_tensors(model) if t.kind != "token_embd"]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = {}
    for d in devices:
        for act_order in (False, True):
            err = rtn_err = 0.0
            if d == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = {}
            for t in tensors:
                out[t.name] = gptq_quantize(params[t.name].detach().numpy(), fmt, stats.gram(t), act_order=act_order,
                                            device=d)
            if d == "cuda":
                torch.cuda.synchronize()
            secs = time.perf_counter() - t0
            for t in tensors:
                w = params[t.name].detach().numpy()
                g = stats.gram(t).double()
                q = gq.dequantize(out[t.name], fmt.ggml_type).reshape(w.shape)
                dq = torch.from_numpy(w - q).double()
                err += float(((dq @ g) * dq).sum())
                r = torch.from_numpy(w - fmt.roundtrip(w, torch.diagonal(stats.gram(t)).numpy())).double()
                rtn_err += float(((r @ g) * r).sum())
            results[(d, act_order)] = out
            print(f"GPTQ {args.format} act_order={act_order} on {d}: {len(tensors)} tensors in {secs:.1f} s; "
                  f"output error {err:.4f} vs RTN {rtn_err:.4f} ({100 * (err / rtn_err - 1):+.1f} %)", flush=True)
    if "cuda" in devices:
        for ao in (False, True):
            a, b = results[("cpu", ao)], results[("cuda", ao)]
            same = np.mean([np.mean(a[n] == b[n]) for n in a])
            print(f"act_order={ao}: CUDA and CPU block bytes identical for {100 * same:.2f} % of bytes")


if __name__ == "__main__":
    main()
