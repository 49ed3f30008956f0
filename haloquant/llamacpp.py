"""llama.cpp as the judge of a GGUF: perplexity by llama-perplexity's protocol, via llama-cpp-python.

llama.cpp tokenizes the text itself (its tokenizer is part of what is being checked), places BOS
where the file says so (tokenizer.ggml.add_bos_token, as llama-perplexity), chunks it exactly as
`textdata.eval_chunks` does and scores the second half of every chunk.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy.special import log_softmax

from haloquant import HaloquantError
from haloquant.progress import track
from haloquant.textdata import scored_slice


def default_threads() -> int:
    """llama.cpp's threads: the process's torch thread budget (OMP_NUM_THREADS, or what a Dask task
    set), not one per core — concurrent tasks on one host would each spin a thread per core (ggml's
    workers busy-wait), which made 4 concurrent sweep points take 10× as long each."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else (os.cpu_count() or 1)


def _llama_cpp():
    try:
        import llama_cpp
    except (ImportError, OSError) as e:  # pragma: no cover - depends on the install
        raise HaloquantError(
            "validate.runtimes: llama_cpp requires the llama-cpp-python package (pip install -e .)"
        ) from e
    return llama_cpp


def llama_cpp_tokens(gguf_path: Path, text: str, special: bool = False) -> tuple[list[int], bool]:
    """llama.cpp's tokens of `text` as it would feed them (BOS first where the file adds one), and
    whether it adds BOS."""
    llm = _llama_cpp().Llama(str(gguf_path), n_ctx=16, vocab_only=True, verbose=False)
    return llm.tokenize(text.encode("utf-8"), add_bos=True, special=special), llm._model.add_bos_token()


def llama_cpp_perplexity(gguf_path: Path, text: str, ctx: int, max_chunks: int | None,
                         threads: int | None = None, keep_logprobs: bool | Path = False,
                         reference: np.ndarray | None = None) -> dict:
    """Perplexity of the GGUF on `text` as llama-perplexity computes it; also returns the token ids and
    each chunk's summed NLL (for paired comparisons of two files on the same chunks).

    keep_logprobs: also return "logprobs", float32 (chunks, scored positions, vocab) — for the
    reference file (chunks × ctx/2 × vocab × 4 bytes: 0.8 GB for 100 chunks of an 8k vocabulary);
    a path instead of True keeps them in a .npy file there, memory-mapped (15 GB for a 152k one).
    reference: such an array from another file; returns each chunk's summed KL(reference ‖ this) and
    the mean per token, what llama-perplexity --kl-divergence reports: far less noisy than perplexity
    for telling two close files apart."""
    lc = _llama_cpp()
    t0 = time.perf_counter()
    llm = lc.Llama(str(gguf_path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True, verbose=False,
                   n_threads=threads or default_threads(), seed=0)
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)  # add_bos: as the file says
    add_bos = llm._model.add_bos_token()
    n = len(tokens) // ctx
    if max_chunks is not None:
        n = min(n, max_chunks)
    if reference is not None and reference.shape[0] < n:
        raise HaloquantError(f"reference log-probs hold {reference.shape[0]} chunks, {n} are scored")
    bos = llm.token_bos()
    sl = scored_slice(ctx)
    chunk_nll, chunk_kl, kept = [], [], []
    if isinstance(keep_logprobs, Path):
        kept = np.lib.format.open_memmap(keep_logprobs, mode="w+", dtype=np.float32,
                                         shape=(n, len(range(ctx)[sl]), llm.n_vocab()))
    for c in track(range(n), f"llama.cpp perplexity of {Path(gguf_path).name}", "chunks"):
        chunk = tokens[c * ctx : (c + 1) * ctx]
        if add_bos:
            chunk[0] = bos
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[: ctx], dtype=np.float64)[sl]
        target = np.asarray(chunk[sl.start + 1 : sl.stop + 1])
        logp = log_softmax(logits, axis=-1)
        chunk_nll.append(float(-logp[np.arange(len(target)), target].sum()))
        if reference is not None:
            ref = reference[c].astype(np.float64)
            chunk_kl.append(float((np.exp(ref) * (ref - logp)).sum()))
        if isinstance(keep_logprobs, Path):
            kept[c] = logp
        elif keep_logprobs:
            kept.append(logp.astype(np.float32))
    count = n * len(range(ctx)[sl])
    if count == 0:
        raise HaloquantError(f"validate.text: fewer than validate.ctx={ctx} tokens for llama.cpp")
    out = {"ppl": math.exp(sum(chunk_nll) / count), "n_tokens": count, "n_chunks": n,
           "seconds": time.perf_counter() - t0, "chunk_nll": chunk_nll, "tokens": tokens,
           "bos_id": bos if add_bos else None}
    if reference is not None:
        out.update(kl=sum(chunk_kl) / count, chunk_kl=chunk_kl)
    if isinstance(keep_logprobs, Path):
        kept.flush()
        out["logprobs"] = kept
    elif keep_logprobs:
        out["logprobs"] = np.stack(kept)
    return out


def same_tokens_as_torch(llama_tokens: list[int], llama_bos: int | None, torch_bos: int | None, ids: list[int],
                         n: int) -> bool:
    """llama.cpp tokenizes the text itself and places BOS as its file says: its first n tokens must be
    the HF tokenizer's with torch's BOS decision, or the two perplexities are not of the same text."""
    expected = ([] if torch_bos is None else [torch_bos]) + ids[:n]
    return llama_bos == torch_bos and llama_tokens[:n] == expected[:n]


def ggml_library_files() -> list[Path]:
    """llama-cpp-python's compiled ggml/llama libraries (their bytes are its build)."""
    libdir = Path(_llama_cpp().__file__).parent / "lib"
    files = sorted(p for p in libdir.iterdir() if p.name.startswith(("libggml", "libllama", "ggml", "llama"))
                   and not p.is_symlink()) if libdir.is_dir() else []
    if not any("ggml-base" in p.name for p in files):
        raise HaloquantError(f"llama-cpp-python's ggml library is not in {libdir}")
    return files


@functools.lru_cache(maxsize=1)
def _ggml_lib():
    import ctypes

    base = next(p for p in ggml_library_files() if "ggml-base" in p.name)
    lib = ctypes.CDLL(str(base))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    return lib


def ggml_quantize(fmt, weight: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's own quantizer (ggml_quantize_chunk, what llama-quantize calls per tensor), with
    an optional importance matrix: the baseline haloquant's encoders are measured against. Types
    whose search needs one (IQ2_XXS, IQ2_XS, IQ1_S: ggml aborts without) get a uniform one."""
    w = np.ascontiguousarray(weight, dtype=np.float32)
    out = np.zeros((w.shape[0], fmt.storage_bytes(w.shape) // w.shape[0]), dtype=np.uint8)
    lib = _ggml_lib()
    if imatrix is None and lib.ggml_quantize_requires_imatrix(int(fmt.ggml_type)):
        imatrix = np.ones(w.shape[1], np.float32)
    imat = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    lib.ggml_quantize_init(int(fmt.ggml_type))
    n = lib.ggml_quantize_chunk(int(fmt.ggml_type), w.ctypes.data, out.ctypes.data, 0, w.shape[0], w.shape[1],
                                None if imat is None else imat.ctypes.data)
    assert n == out.nbytes
    return out


def llama_quantize_preset(src: Path, dst: Path, preset: str, threads: int | None = None,
                          dry_run: bool = False) -> None:
    """llama-quantize's preset rules (e.g. Q4_K_M) applied to a GGUF, without an imatrix; `dry_run`:
    only log each tensor's type (nothing written; also for presets that need an imatrix)."""
    import ctypes

    lc = _llama_cpp()
    params = lc.llama_model_quantize_default_params()
    params.ftype = getattr(lc, f"LLAMA_FTYPE_MOSTLY_{preset}")
    params.nthread = threads or default_threads()
    params.dry_run = dry_run
    rc = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise HaloquantError(f"llama_model_quantize failed for {preset} (code {rc})")
