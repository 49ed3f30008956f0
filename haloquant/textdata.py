"""Text → token batches, for calibration and for llama.cpp-protocol evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from haloquant import HaloquantError
from haloquant.artifacts import sha256_file


def read_text(path: str | Path, field: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise HaloquantError(f"{field}: file {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise HaloquantError(f"{field}: file {str(p)!r} is empty (expected plain text)")
    return text


def check_disjoint(calibration: Path, evaluation: Path) -> None:
    """Calibrating on the evaluation text would make every validated number a lie."""
    if Path(calibration).resolve() == Path(evaluation).resolve() or (
        Path(calibration).is_file()
        and Path(evaluation).is_file()
        and sha256_file(calibration) == sha256_file(evaluation)
    ):
        raise HaloquantError(
            f"calibration.text: {str(calibration)!r} is the same text as validate.text {str(evaluation)!r}; "
            "calibrate on text that is never evaluated"
        )


def tokenize(tokenizer, text: str) -> list[int]:
    """Token ids of the whole text, no special tokens (BOS is placed by the callers)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def sequence_bos(tokenizer, add_bos: bool | None) -> int | None:
    """The token every sequence starts with (calibration windows, evaluation chunks), or None.
    `add_bos` is model.add_bos; None means: as the model's own tokenizer does (Llama 3 and Gemma add
    BOS, Qwen2 does not). The GGUF says the same (the converter reads the same tokenizer files, or
    model.add_bos overrides it), and validate checks that llama.cpp agrees."""
    if add_bos is None:
        ids = tokenizer("a")["input_ids"]
        add_bos = tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id
    if not add_bos:
        return None
    if tokenizer.bos_token_id is None:
        raise HaloquantError("model.add_bos: true, but the model's tokenizer has no BOS token")
    return tokenizer.bos_token_id


def calibration_batch(ids: list[int], n: int, seq_len: int, seed: int, bos_id: int | None) -> torch.Tensor:
    """n windows of seq_len tokens at seeded random offsets, each starting with BOS (as at inference)."""
    body = seq_len - (1 if bos_id is not None else 0)
    if len(ids) < body + 1:
        raise HaloquantError(
            f"calibration.text: only {len(ids)} tokens, fewer than calibration.seq_len={seq_len}"
        )
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - body, size=n)
    arr = np.asarray(ids, dtype=np.int64)
    rows = [arr[s : s + body] for s in starts]
    if bos_id is not None:
        rows = [np.concatenate([[bos_id], r]) for r in rows]
    return torch.from_numpy(np.stack(rows))


def eval_chunks(ids: list[int], ctx: int, max_chunks: int | None, bos_id: int | None) -> torch.Tensor:
    """llama.cpp `llama-perplexity` chunking: BOS + text, cut into ctx-token chunks, chunk[0] = BOS.

    Tokens ctx/2 .. ctx-1 of each chunk are scored (`scored_positions`), as llama-perplexity does,
    so the two implementations can be compared number for number.
    """
    toks = ([bos_id] if bos_id is not None else []) + list(ids)
    n = len(toks) // ctx
    if max_chunks is not None:
        n = min(n, max_chunks)
    if n == 0:
        raise HaloquantError(f"validate.text: fewer than validate.ctx={ctx} tokens")
    chunks = torch.tensor(toks[: n * ctx], dtype=torch.int64).view(n, ctx).clone()
    if bos_id is not None:
        chunks[:, 0] = bos_id
    return chunks


def scored_slice(ctx: int) -> slice:
    """Logit positions whose next-token prediction is scored (llama-perplexity: first = ctx/2)."""
    return slice(ctx // 2, ctx - 1)
