"""Issue 14's question: what is the per-block comparison with llama.cpp's quantizer worth?

    python bench/llama_cpp_candidate.py --model ../shared/models/ref-llama-a

`QuantFormat.encode` keeps, block by block, the better of haloquant's own fit and llama.cpp's
(ggml_quantize_chunk with the same importance). That second encode is about a third of the
sensitivity stage's time on SmolLM2-135M. For every quantizable tensor of the model and every
format: the importance-weighted error Σ imp·(w−q)² of haloquant's fit alone and of the best of
both, the share of blocks where llama.cpp's block wins, and the seconds each costs (all threads).
RTN with the calibration imatrix, as the default quantize stage; GPTQ goes through the same
`encode` per column block.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from haloquant.calibstats import CalibrationStats
from haloquant.formats import get_format
from haloquant.llamacpp import ggml_quantize
from haloquant.modelio import load_model, quantizable_tensors

from common import REPO, setup  # noqa: E402  (bench/ is on sys.path when run as a script)

FORMATS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=REPO.parent / "shared/models/ref-llama-a")
    ap.add_argument("--out", type=Path, default=Path("/tmp/haloquant-llamacpp-candidate"))
    ap.add_argument("--formats", nargs="+", default=FORMATS)
    args = ap.parse_args()
    spec, calib, _ = setup(args.model, args.out)
    model = load_model(spec.path, "cpu")
    stats = CalibrationStats(calib)
    params = dict(model.named_parameters())
    infos = [t for t in quantizable_tensors(model)]
    print(f"{args.model.name}: {len(infos)} tensors; importance = calibration E[x²]\n")
    print("| format | error, best of both / own fit (geomean over tensors) | worst tensor | blocks from llama.cpp | "
          "own fit (s) | llama.cpp (s) | choosing (s) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.formats:
        fmt = get_format(name)
        ratios, won, blocks, t_own, t_lc, t_pick = [], 0, 0, 0.0, 0.0, 0.0
        for t in infos:
            w = np.ascontiguousarray(params[t.name].detach().float().numpy())
            if not fmt.supports(w.shape):
                continue
            imp = stats.importance(t)
            t0 = time.perf_counter()
            own = fmt.encode_own(w, imp)
            t1 = time.perf_counter()
            theirs = ggml_quantize(fmt, w, imp)
            t2 = time.perf_counter()
            both = fmt.best_blocks(w, imp, own, theirs)
            t3 = time.perf_counter()
            t_own, t_lc, t_pick = t_own + t1 - t0, t_lc + t2 - t1, t_pick + t3 - t2
            err = lambda q: float((((fmt.decode(q, w.shape) - w) ** 2) * imp).sum())  # noqa: E731
            e_own = err(own)
            ratios.append(err(both) / e_own if e_own > 0 else 1.0)  # 0: the weights already lie on the grid
            per_block = both.reshape(w.shape[0], -1, fmt.type_size) != own.reshape(w.shape[0], -1, fmt.type_size)
            won += int(per_block.any(-1).sum())
            blocks += per_block.shape[0] * per_block.shape[1]
        if not ratios:
            continue
        r = np.array(ratios)
        print(f"| {name} | {np.exp(np.log(r).mean()):.4f} | {r.min():.4f} | {100 * won / blocks:.1f} % | "
              f"{t_own:.1f} | {t_lc:.1f} | {t_pick:.1f} |", flush=True)


if __name__ == "__main__":
    main()
