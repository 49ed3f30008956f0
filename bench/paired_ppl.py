"""Is one GGUF's perplexity really lower than another's? llama.cpp perplexity of several files on
the same chunks, and for each against the reference a paired bootstrap over chunks: the relative
perplexity difference with its 95 % interval. Differences of a few hundredths of a percent (the
Q6_K row of kquant_presets.py) are inside the noise of 100 chunks; this says how far.

    python bench/paired_ppl.py --ref imatrix=/tmp/haloquant-kquants/Q6_K/llamacpp/gguf/model.gguf \\
        rtn=/tmp/haloquant-kquants/Q6_K/rtn/gguf/model.gguf gptq=/tmp/haloquant-kquants/Q6_K/gptq/gguf/model.gguf \\
        --chunks 0 --save /tmp/q6k_chunks.json          # 0 = the whole WikiText-2 test file
    python bench/paired_ppl.py --load /tmp/q6k_chunks.json --ref imatrix --first 100   # re-analyse a subset
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from haloquant.textdata import scored_slice

from common import EVAL_TEXT  # noqa: E402  (bench/ is on sys.path when run as a script)

CTX = 512
TOKENS_PER_CHUNK = len(range(CTX)[scored_slice(CTX)])  # the positions llama-perplexity scores


def cached_score(path: Path, text: str, chunks: int, reference) -> dict:
    """llama.cpp's perplexity and KL (against `reference` log-probabilities) of one GGUF with its per-chunk
    values, kept beside it (score.json) so a bench called again reuses it. The cache is keyed by the file's
    sha256: a file rebuilt at the same path is scored again, and a byte-identical file in a sibling row folder
    (RUN/size/<row>/gguf/, the same reference; the lattice rows often allocate no i-quant) is scored once.
    A score.json written before the key existed is taken as it is and given the key."""
    from haloquant.artifacts import read_json, sha256_file, write_json
    from haloquant.llamacpp import llama_cpp_perplexity

    cache = path.parent / "score.json"
    digest = sha256_file(path)
    kept = read_json(cache) if cache.is_file() else {}
    if kept.get("chunks") == chunks and kept.get("sha256", digest) == digest:
        if "sha256" not in kept:
            write_json(cache, {**kept, "sha256": digest})
        return kept
    for other in sorted(path.parent.parent.parent.glob(f"*/{path.parent.name}/score.json")):
        kept = read_json(other)
        if other != cache and kept.get("sha256") == digest and kept.get("chunks") == chunks:
            write_json(cache, {**kept, "same_as": str(other)})
            return kept
    r = llama_cpp_perplexity(path, text, CTX, chunks, reference=reference)
    out = {"chunks": chunks, "bytes": path.stat().st_size, "sha256": digest, "ppl": r["ppl"], "kl": r["kl"],
           "chunk_nll": r["chunk_nll"], "chunk_kl": r["chunk_kl"]}
    write_json(cache, out)
    return out


def paired(x: np.ndarray, y: np.ndarray, tokens_per_chunk: int, n_boot: int = 4000, seed: int = 0):
    """ppl(x)/ppl(y) − 1 over the same chunks, and its 95 % bootstrap interval (chunks resampled)."""
    diff = (x - y) / tokens_per_chunk
    rng = np.random.default_rng(seed)
    boots = np.exp(diff[rng.integers(0, len(diff), (n_boot, len(diff)))].mean(1)) - 1
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return math.exp(diff.mean()) - 1, lo, hi


def paired_ratio(x: np.ndarray, y: np.ndarray, n_boot: int = 4000, seed: int = 0):
    """Σx/Σy − 1 for per-chunk sums (e.g. KL) over the same chunks, and its 95 % bootstrap interval."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), (n_boot, len(x)))
    lo, hi = np.percentile(x[idx].sum(1) / y[idx].sum(1) - 1, [2.5, 97.5])
    return x.sum() / y.sum() - 1, lo, hi


def scores_of(gguf: Path, run_gguf: Path, stored: dict, key: str, text: str, chunks: int, reference) -> dict:
    """llama.cpp's per-chunk scores of `gguf` against the F16 `reference`; reused from a bench run's results.json
    (`stored`, entry `key`) where `gguf` is that run's file `run_gguf` byte for byte."""
    import filecmp

    from haloquant.llamacpp import llama_cpp_perplexity

    if filecmp.cmp(gguf, run_gguf, shallow=False) and key in stored["chunk_nll"]:
        nll = stored["chunk_nll"][key]
        print(f"{key}: rebuilt byte for byte; the run's scores reused", flush=True)
        return {"chunk_nll": nll, "chunk_kl": stored["chunk_kl"][key], "kl": stored["kl"][key],
                "ppl": float(np.exp(np.sum(nll) / (len(nll) * TOKENS_PER_CHUNK)))}
    return llama_cpp_perplexity(gguf, text, CTX, chunks, reference=reference)


def paired_changes(new: dict, old: dict) -> tuple[tuple, tuple]:
    """(perplexity change, KL change) of `new` against `old`, each (value, 95 % low, 95 % high), paired over chunks."""
    return (paired(np.array(new["chunk_nll"]), np.array(old["chunk_nll"]), TOKENS_PER_CHUNK),
            paired_ratio(np.array(new["chunk_kl"]), np.array(old["chunk_kl"])))


def before_after_cells(row: dict) -> str:
    """A table's 'ppl without | ppl with | change (95 %) | KL without | KL with | change (95 %)' cells, from a
    row with ppl_without/ppl_with/ppl_change and the same for kl (bench/corrections.py, bench/refine.py)."""
    d, lo, hi = row["ppl_change"]
    k, klo, khi = row["kl_change"]
    return (f"{row['ppl_without']:.3f} | {row['ppl_with']:.3f} | "
            f"{100 * d:+.2f} % ({100 * lo:+.2f} … {100 * hi:+.2f}) | "
            f"{row['kl_without']:.5f} | {row['kl_with']:.5f} | "
            f"{100 * k:+.1f} % ({100 * klo:+.1f} … {100 * khi:+.1f})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="*", help="label=path.gguf")
    ap.add_argument("--ref", required=True, help="label=path.gguf, or with --load the reference's label")
    ap.add_argument("--chunks", type=int, default=100, help="chunks of 512 tokens; 0 = the whole file")
    ap.add_argument("--first", type=int, default=None, help="analyse only the first N chunks")
    ap.add_argument("--save", type=Path)
    ap.add_argument("--load", type=Path)
    args = ap.parse_args()
    ctx, tokens_per_chunk = CTX, TOKENS_PER_CHUNK
    if args.load:
        nll = {k: np.array(v) for k, v in json.loads(args.load.read_text()).items()}
        ref = args.ref
    else:
        from haloquant.llamacpp import llama_cpp_perplexity
        from haloquant.textdata import read_text

        text = read_text(EVAL_TEXT, "eval")
        files = dict(f.split("=", 1) for f in [args.ref, *args.files])
        ref = args.ref.split("=", 1)[0]
        nll = {}
        for label, path in files.items():
            r = llama_cpp_perplexity(Path(path), text, ctx, args.chunks or None)
            nll[label] = np.array(r["chunk_nll"])
            print(f"{label}: ppl {r['ppl']:.4f} over {r['n_chunks']} chunks ({r['seconds']:.0f} s)", flush=True)
        if args.save:
            args.save.write_text(json.dumps({k: v.tolist() for k, v in nll.items()}))
    n = args.first or len(nll[ref])
    nll = {k: v[:n] for k, v in nll.items()}
    print(f"\nllama.cpp perplexity, WikiText-2 test, ctx {ctx}, {n} chunks; paired bootstrap over chunks vs {ref}\n")
    print(f"| file | ppl | vs {ref} | 95 % interval |")
    print("|---|---|---|---|")
    for label, x in nll.items():
        ppl = math.exp(x.sum() / (len(x) * tokens_per_chunk))
        if label == ref:
            print(f"| {label} | {ppl:.4f} | | |")
            continue
        rel, lo, hi = paired(x, nll[ref], tokens_per_chunk)
        print(f"| {label} | {ppl:.4f} | {100 * rel:+.3f} % | {100 * lo:+.3f} … {100 * hi:+.3f} % |")


if __name__ == "__main__":
    main()
