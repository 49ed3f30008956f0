"""Running a causal LM one decoder block at a time on calibration windows (block tuning, sequential
GPTQ and the per-block Hessians all carry each block's input from the block before)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from haloquant.modelio import decoder_layers
from haloquant.streaming import compute_device, on_device


class _Stop(Exception):
    pass


@torch.no_grad()
def block_inputs(model, ids: torch.Tensor, batch: int) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Block 0's input hidden states per minibatch, and every block's keyword arguments per
    minibatch (position embeddings, masks: Gemma's alternate between sliding and global).

    No decoder block computes anything here: each block's forward is replaced, for this call
    only, by one that records its arguments and hands its input on, so the cost is the embedding
    and the mask/rotary set-up — and a caller can keep the blocks' weights off the device."""
    layers = decoder_layers(model)
    device = next(model.get_input_embeddings().parameters()).device
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict]] = [[] for _ in layers]

    def recorder(i):
        def forward(*args, **kw):
            h = args[0] if args else kw["hidden_states"]
            if i == 0:
                hidden.append(h.detach())
            kwargs[i].append({k: v for k, v in kw.items() if k not in ("hidden_states", "past_key_values",
                                                                        "past_key_value")})
            if i == len(layers) - 1:
                raise _Stop
            return h
        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)  # an instance attribute: nn.Module.__call__ finds it first
    try:
        for s in range(0, ids.shape[0], batch):
            try:
                model(ids[s : s + batch].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for layer in layers:
            del layer.forward
    return hidden, kwargs


def block_output(y):
    """A decoder block's hidden states (older transformers, and Gemma 2/3, return them in a tuple)."""
    return y[0] if isinstance(y, tuple) else y


def with_hidden(y, hidden: torch.Tensor):
    """A block's output `y` in its own form (tensor or tuple) with `hidden` as its hidden states."""
    return (hidden, *y[1:]) if isinstance(y, tuple) else hidden


@contextlib.contextmanager
def replaying(layers, outputs: list) -> Iterator[None]:
    """For the `with`, block i computes nothing and returns outputs[i] (as its forward would have):
    the model's own forward still runs around the blocks (embedding, masks, final norm, head, a
    family's logit soft-cap). A replayed block reads no weight, so a streamed one is not moved."""
    for layer, out in zip(layers, outputs):
        layer.forward = (lambda o: lambda *a, **k: o)(out)  # an instance attribute: found before the class's
    try:
        yield
    finally:
        for layer, _ in zip(layers, outputs):
            del layer.forward


def logits_after_blocks(model, ids: torch.Tensor, last_output) -> torch.Tensor:
    """The model's logits for `ids` given what its last decoder block returned for them."""
    layers = decoder_layers(model)
    with replaying(layers, [last_output] * len(layers)):
        return model(ids, use_cache=False).logits


@torch.no_grad()
def run_blocks(model, ids: torch.Tensor, batch: int) -> list:
    """What the last decoder block returns for each micro-batch of `ids`, computed block by block
    over all micro-batches (a streamed block is moved to the device once, not once per batch)."""
    x, kwargs = block_inputs(model, ids, batch)
    y, device = x, compute_device(model)
    for layer, kw in zip(decoder_layers(model), kwargs):
        with on_device(layer, device):
            y = [layer(block_output(h), **k) for h, k in zip(y, kw)]
    return y


def module_name(model, module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ValueError("not a module of the model")
