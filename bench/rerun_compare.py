"""Has a re-run of bench/kquant_presets.py kept its numbers? Every row of two runs' results.json,
chunk by chunk: perplexity and KL of the new run against the old with 95 % paired bootstrap
intervals, and a verdict per row (better: interval below 0; within: it holds 0; WORSE).

    python bench/rerun_compare.py bench/results/kquant_presets_ref-llama-a.json /tmp/haloquant-kquants/results.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from paired_ppl import TOKENS_PER_CHUNK, paired, paired_ratio  # noqa: E402  (bench/ is on sys.path as a script)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    args = ap.parse_args()
    old, new = json.loads(args.old.read_text()), json.loads(args.new.read_text())
    print("| preset | row | ppl then | ppl now | now vs then (95 %) | KL then | KL now | KL now vs then (95 %) | verdict |")
    print("|---|---|---|---|---|---|---|---|---|")
    worse = 0
    for key in (k for k in new["chunk_nll"] if k in old["chunk_nll"]):
        preset, label = key.split("/", 1)
        n = min(len(new["chunk_nll"][key]), len(old["chunk_nll"][key]))
        a, b = np.array(new["chunk_nll"][key][:n]), np.array(old["chunk_nll"][key][:n])
        d, lo, hi = paired(a, b, TOKENS_PER_CHUNK)
        kl = "| |"
        if new["chunk_kl"].get(key) and old["chunk_kl"].get(key):
            kn, ko = np.array(new["chunk_kl"][key][:n]), np.array(old["chunk_kl"][key][:n])
            k, klo, khi = paired_ratio(kn, ko)
            per_token = n * TOKENS_PER_CHUNK
            kl = f"{ko.sum() / per_token:.4f} | {kn.sum() / per_token:.4f} | {k:+.1%} ({klo:+.1%} … {khi:+.1%})"
        then, now = (float(np.exp(x.sum() / (n * TOKENS_PER_CHUNK))) for x in (b, a))
        verdict = "better" if hi < 0 else "within" if lo <= 0 else "WORSE"
        worse += verdict == "WORSE"
        print(f"| {preset} | {label} | {then:.3f} | {now:.3f} | {d:+.2%} ({lo:+.2%} … {hi:+.2%}) | {kl} | {verdict} |")
    print(f"\nrows worse beyond their interval: {worse}")


if __name__ == "__main__":
    main()
