"""Running a causal LM one decoder block at a time on calibration windows (block tuning, sequential
GPTQ and the per-block Hessians all carry each block's input from the block before)."""

from __future__ import annotations

import torch

from haloquant.modelio import decoder_layers


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
    """A decoder block's hidden states (older transformers return them in a tuple)."""
    return y[0] if isinstance(y, tuple) else y


def module_name(model, module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ValueError("not a module of the model")
