"""llama.cpp as the judge of a GGUF: perplexity by llama-perplexity's protocol, via llama-cpp-python.

llama.cpp tokenizes the text itself (its tokenizer is part of what is being checked), chunks it
exactly as `textdata.eval_chunks` does and scores the second half of every chunk.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np

from haloquant import HaloquantError
from haloquant.textdata import scored_slice


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - depends on the install
        raise HaloquantError(
            "validate.runtimes: llama_cpp requires the llama-cpp-python package (pip install -e .)"
        ) from e
    return llama_cpp


def llama_cpp_tokens(gguf_path: Path, text: str) -> list[int]:
    llm = _llama_cpp().Llama(str(gguf_path), n_ctx=16, vocab_only=True, verbose=False)
    return llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)


def llama_cpp_perplexity(gguf_path: Path, text: str, ctx: int, max_chunks: int | None,
                         threads: int | None = None) -> dict:
    """Perplexity of the GGUF on `text` as llama-perplexity computes it; also returns the token ids."""
    lc = _llama_cpp()
    t0 = time.perf_counter()
    llm = lc.Llama(str(gguf_path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True, verbose=False,
                   n_threads=threads or os.cpu_count(), seed=0)
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    n = len(tokens) // ctx
    if max_chunks is not None:
        n = min(n, max_chunks)
    bos = llm.token_bos()
    sl = scored_slice(ctx)
    nll, count = 0.0, 0
    for c in range(n):
        chunk = tokens[c * ctx : (c + 1) * ctx]
        chunk[0] = bos
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[: ctx], dtype=np.float64)[sl]
        target = np.asarray(chunk[sl.start + 1 : sl.stop + 1])
        m = logits.max(-1, keepdims=True)
        logz = (m[:, 0] + np.log(np.exp(logits - m).sum(-1)))
        nll += float((logz - logits[np.arange(len(target)), target]).sum())
        count += len(target)
    if count == 0:
        raise HaloquantError(f"validate.text: fewer than validate.ctx={ctx} tokens for llama.cpp")
    return {"ppl": math.exp(nll / count), "n_tokens": count, "n_chunks": n, "seconds": time.perf_counter() - t0,
            "tokens": tokens}
