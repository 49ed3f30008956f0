"""Diagonal Fisher information of a causal LM's outputs with respect to its layers' outputs.

For a small change δz of a linear's output z = W x, the KL divergence of the model's next-token
distribution from the float model's is, to second order, ½ δzᵀ F δz with F = E[g gᵀ] and g the
gradient of −log p(y) with respect to z, y drawn from the model's own distribution (the Fisher,
not the empirical Fisher of the text's labels). Keeping F's diagonal per output channel (BRECQ's
approximation) and treating it as independent of the input gives, per token,

    KL ≈ ½ Σ_i f_i E[(ΔW x)_i²] = ½ Σ_i f_i (ΔW G ΔWᵀ)_ii,     f_i = E_tokens[g_i²]

in the units of a per-token KL: one forward and one backward pass over the sequences price every
tensor and format, however deep the model (a KL probe per tensor costs half a forward each).
The token embedding's lookup is priced the same way by the gradient at decoder block 0's input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from haloquant.blocks import block_inputs, block_output, logits_after_blocks, with_hidden
from haloquant.modelio import decoder_layers
from haloquant.streaming import compute_device, on_device


@dataclass(frozen=True)
class OutputFisher:
    channels: dict[str, torch.Tensor]  # per module: E[g²] per output channel, per token
    block0: torch.Tensor  # the same for the hidden state entering decoder block 0
    coherence: dict[str, float]  # per module: how much the positions' errors add up coherently (see below)


def output_fisher(model, ids: torch.Tensor, modules: list[str], seed: int = 0) -> OutputFisher:
    """The diagonal Fisher of every listed module's output over every position of `ids`
    (sequences × tokens), and of the hidden state entering decoder block 0 (what an embedding
    lookup adds to).

    Diagonal across positions too, it would miss that a weight's error repeats at every position
    and that attention adds those repeats up (v_proj: by 2–4×). For i.i.d. weight errors the exact
    Fisher of the weight gives E[⟨ΔW, Σ_t g_t x_tᵀ⟩²] ∝ Σ_{t,s} (g_t·g_s)(x_t·x_s), the diagonal one
    Σ_t |g_t|²|x_t|²: their ratio, measured per module, is `coherence`.

    Labels are sampled from the model's own next-token distribution with a seeded generator, so the
    result is reproducible. The passes run block-major: the forward takes every sequence through
    one block before the next and keeps only the blocks' inputs; the backward recomputes one block
    at a time from those inputs (activation checkpointing per block), every sequence through it.
    So a streamed model (haloquant/streaming.py) has one block on the device, moved there twice in
    all (sequence-major, it moved twice per sequence: 512 moves of 436 MB for Llama-3-8B and 8
    sequences), and memory is one block's weights and activations plus every block's inputs
    (8 × 256 tokens × 4096 × 4 bytes per block for Llama-3-8B: 1 GB in all). Each module's and block
    0's sums take the sequences in the same order as before, so the numbers are unchanged. The model's
    parameters are left as they were (no gradients are kept for them)."""
    device = compute_device(model)
    layers = decoder_layers(model)
    named = dict(model.named_modules())
    sums = {m: None for m in modules}
    coherence = {m: (0.0, 0.0) for m in modules}
    block0 = [None]
    gen = torch.Generator().manual_seed(seed)

    def accumulate(key, store, g):
        s = g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(0)
        store[key] = s if store[key] is None else store[key] + s

    def coherence_terms(name, x):
        def on_grad(g):
            g, xx = g.detach().float(), x.detach().float()
            gg, gx = g @ g.transpose(-1, -2), xx @ xx.transpose(-1, -2)  # positions × positions
            both, own = coherence[name]
            coherence[name] = (both + float((gg * gx).sum()),
                               own + float((gg.diagonal(0, -2, -1) * gx.diagonal(0, -2, -1)).sum()))
        return on_grad

    def on_output(name):
        def hook(_module, args, out):
            if out.requires_grad:
                out.register_hook(lambda g: accumulate(name, sums, g))
                out.register_hook(coherence_terms(name, args[0]))
        return hook

    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    handles = [named[m].register_forward_hook(on_output(m)) for m in modules]  # only grad-carrying calls count
    n_tokens = 0
    try:
        xs, kwargs = block_inputs(model, ids.to(device), 1)  # one sequence per entry
        inputs: list[list[torch.Tensor]] = []  # per block, per sequence: the block's input
        ys = xs
        with torch.no_grad():  # forward, block-major: a streamed block comes to the device once
            for layer, kw in zip(layers, kwargs):
                inputs.append([block_output(y) for y in ys])
                with on_device(layer, device):
                    ys = [layer(h, **k) for h, k in zip(inputs[-1], kw)]
        grads = []
        for s, y in enumerate(ys):  # the head, and labels drawn in sequence order
            top = block_output(y).detach().requires_grad_(True)
            with torch.enable_grad():
                logits = logits_after_blocks(model, ids[s:s + 1].to(device), with_hidden(y, top)).float()[0]
                logp = F.log_softmax(logits, -1)
                labels = torch.multinomial(logp.detach().exp().cpu(), 1, generator=gen).to(device)
                (-logp.gather(-1, labels).sum()).backward()
            grads.append(top.grad)
            n_tokens += ids[s].numel()
        for layer, kw, hs in zip(reversed(layers), reversed(kwargs), reversed(inputs)):
            with on_device(layer, device):  # backward: each block recomputed from its inputs, once on the device
                for s, (h, k) in enumerate(zip(hs, kw)):
                    h = h.detach().requires_grad_(True)
                    with torch.enable_grad():
                        block_output(layer(h, **k)).backward(grads[s])
                    grads[s] = h.grad
            del hs[:]  # this block's inputs are done with
        for g in grads:  # at decoder block 0's input: what an embedding lookup adds to
            accumulate(0, block0, g)
    finally:
        for handle in handles:
            handle.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(requires[n])
    missing = [m for m, s in sums.items() if s is None]
    if missing or block0[0] is None:
        raise RuntimeError(f"no gradient reached {missing or ['decoder block 0']}")
    return OutputFisher(channels={m: (s / n_tokens).cpu() for m, s in sums.items()},
                        block0=(block0[0] / n_tokens).cpu(),
                        coherence={m: both / own if own > 0 else 1.0 for m, (both, own) in coherence.items()})


def fisher_output_error(delta: torch.Tensor, gram: torch.Tensor, fisher: torch.Tensor) -> float:
    """½ Σ_i f_i (δ G δᵀ)_ii: the second-order KL of an output-channel-diagonal Fisher."""
    return 0.5 * float((((delta @ gram) * delta).sum(1) * fisher.to(delta)).sum())


def fisher_lookup_error(delta: torch.Tensor, token_freq: torch.Tensor, fisher: torch.Tensor) -> float:
    """½ Σ_tok freq_tok Σ_j f_j δ_tok,j²: an embedding lookup's error at block 0's input."""
    return 0.5 * float(((delta.pow(2) @ fisher.to(delta)) * token_freq).sum())
