"""Perplexity and KL divergence in torch, by llama-perplexity's protocol."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from haloquant.progress import track
from haloquant.textdata import scored_slice


@torch.no_grad()
def score(model, chunks: torch.Tensor, ref_model=None, batch_size: int = 4) -> dict:
    """Perplexity of `model` on `chunks`; with `ref_model`, also its perplexity and the mean
    per-token KL(ref ‖ model) over the same scored positions."""
    device = next(model.parameters()).device
    ctx = chunks.shape[1]
    sl = scored_slice(ctx)
    nll = ref_nll = kl = 0.0
    n_tok = 0
    t0 = time.perf_counter()
    for i in track(range(0, chunks.shape[0], batch_size), "torch perplexity", "batches"):
        batch = chunks[i : i + batch_size].to(device)
        target = batch[:, sl.start + 1 : sl.stop + 1]
        logp = F.log_softmax(model(batch).logits[:, sl].float(), dim=-1)
        nll -= logp.gather(-1, target.unsqueeze(-1)).sum().item()
        if ref_model is not None:
            ref_logp = F.log_softmax(ref_model(batch).logits[:, sl].float(), dim=-1)
            ref_nll -= ref_logp.gather(-1, target.unsqueeze(-1)).sum().item()
            kl += (ref_logp.exp() * (ref_logp - logp)).sum().item()
        n_tok += target.numel()
    out = {"ppl": math.exp(nll / n_tok), "n_tokens": n_tok, "seconds": time.perf_counter() - t0}
    if ref_model is not None:
        out["ref_ppl"] = math.exp(ref_nll / n_tok)
        out["kl_mean"] = kl / n_tok
    return out
