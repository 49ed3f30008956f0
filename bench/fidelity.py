"""Does llama.cpp run what torch validated? For each quantize folder and its GGUF: torch's
perplexity of the decoded weights and llama.cpp's of the file, on the same WikiText-2 test chunks
(llama.cpp tokenizes the text itself; its tokens are checked equal to torch's).

    python bench/fidelity.py --model ../shared/models/ref-llama-a --chunks 100 \\
        Q2_K=/tmp/haloquant-kquants/Q2_K/gptq Q4_K_M=/tmp/haloquant-kquants/Q4_K_M/mixed ...

Each folder is a kquant_presets build (quantize/ and gguf/model.gguf inside).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from haloquant.evaluation import score
from haloquant.llamacpp import llama_cpp_perplexity, same_tokens_as_torch
from haloquant.modelio import load_tokenizer
from haloquant.quantized import load_quantized_model, read_quantized
from haloquant.textdata import eval_chunks, read_text, sequence_bos, tokenize

from common import EVAL_TEXT, REPO, model_add_bos  # noqa: E402  (bench/ is on sys.path when run as a script)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("builds", nargs="+", help="label=folder holding quantize/ and gguf/model.gguf")
    ap.add_argument("--model", type=Path, default=REPO.parent / "shared/models/ref-llama-a")
    ap.add_argument("--chunks", type=int, default=100)
    args = ap.parse_args()
    text = read_text(EVAL_TEXT, "eval")
    tok = load_tokenizer(args.model)
    ids = tokenize(tok, text)
    bos = sequence_bos(tok, model_add_bos(args.model))
    chunks = eval_chunks(ids, 512, args.chunks, bos)
    print(f"{args.model.name}: WikiText-2 test, ctx 512, {len(chunks)} chunks\n")
    print("| build | bits/weight (quantized tensors) | torch ppl | llama.cpp ppl | gap |")
    print("|---|---|---|---|---|")
    for label, folder in (b.split("=", 1) for b in args.builds):
        folder = Path(folder)
        t = score(load_quantized_model(args.model, folder / "quantize", "cpu"), chunks)["ppl"]
        lc = llama_cpp_perplexity(folder / "gguf" / "model.gguf", text, 512, args.chunks)
        assert same_tokens_as_torch(lc["tokens"], lc["bos_id"], bos, ids, chunks.numel()), "llama.cpp's tokens differ"
        print(f"| {label} | {read_quantized(folder / 'quantize')[0].bits_per_weight:.3f} | {t:.3f} | {lc['ppl']:.3f} | "
              f"{100 * abs(lc['ppl'] / t - 1):.3f} % |", flush=True)


if __name__ == "__main__":
    main()
