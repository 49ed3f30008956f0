"""Perplexity and KL divergence in torch, by llama-perplexity's protocol."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from haloquant.blocks import logits_after_blocks, run_blocks
from haloquant.progress import track
from haloquant.streaming import compute_device
from haloquant.textdata import scored_slice


@torch.no_grad()
def score(model, chunks: torch.Tensor, ref_model=None, batch_size: int = 4, group: int = 64) -> dict:
    """Perplexity of `model` on `chunks`; with `ref_model`, also its perplexity and the mean
    per-token KL(ref ‖ model) over the same scored positions.

    Chunks go through the decoder blocks `group` at a time, block by block (haloquant.blocks.run_blocks:
    a streamed model moves each block to the device once per group), then through the head
    `batch_size` at a time; the numbers are those of batch-by-batch forward passes."""
    device = compute_device(model)
    group = max(1, group // batch_size) * batch_size  # whole batches: the same batches as one pass each
    ctx = chunks.shape[1]
    sl = scored_slice(ctx)
    nll = ref_nll = kl = 0.0
    n_tok = 0
    t0 = time.perf_counter()
    for g in track(range(0, chunks.shape[0], group), "torch perplexity", "chunk groups"):
        ids = chunks[g : g + group].to(device)
        last = run_blocks(model, ids, batch_size)
        ref_last = run_blocks(ref_model, ids, batch_size) if ref_model is not None else None
        for b, i in enumerate(range(0, ids.shape[0], batch_size)):
            batch = ids[i : i + batch_size]
            target = batch[:, sl.start + 1 : sl.stop + 1]
            logp = F.log_softmax(logits_after_blocks(model, batch, last[b])[:, sl].float(), dim=-1)
            nll -= logp.gather(-1, target.unsqueeze(-1)).sum().item()
            if ref_model is not None:
                ref_logits = logits_after_blocks(ref_model, batch, ref_last[b])
                ref_logp = F.log_softmax(ref_logits[:, sl].float(), dim=-1)
                ref_nll -= ref_logp.gather(-1, target.unsqueeze(-1)).sum().item()
                kl += (ref_logp.exp() * (ref_logp - logp)).sum().item()
            n_tok += target.numel()
    out = {"ppl": math.exp(nll / n_tok), "n_tokens": n_tok, "seconds": time.perf_counter() - t0}
    if ref_model is not None:
        out["ref_ppl"] = math.exp(ref_nll / n_tok)
        out["kl_mean"] = kl / n_tok
    return out
