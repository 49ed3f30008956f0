"""Running a causal LM one decoder block at a time on calibration windows (block tuning and
sequential GPTQ both carry each block's input from the block before)."""

from __future__ import annotations

import torch

from haloquant.modelio import decoder_layers


class _Stop(Exception):
    pass


@torch.no_grad()
def block_inputs(model, ids: torch.Tensor, batch: int) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Block 0's input hidden states per minibatch, and every block's keyword arguments per
    minibatch (position embeddings, masks: Gemma's alternate between sliding and global)."""
    layers = decoder_layers(model)
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict]] = [[] for _ in layers]
    handles = []

    def grab(i):
        def hook(_m, args, kw):
            if i == 0:
                hidden.append((args[0] if args else kw["hidden_states"]).detach())
            kwargs[i].append({k: v for k, v in kw.items() if k != "hidden_states" and k != "past_key_values"
                              and k != "past_key_value"})
            if i == len(layers) - 1:
                raise _Stop
        return hook

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(grab(i), with_kwargs=True))
    try:
        for s in range(0, ids.shape[0], batch):
            try:
                model(ids[s : s + batch], use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return hidden, kwargs


def block_output(y):
    """A decoder block's hidden states (older transformers return them in a tuple)."""
    return y[0] if isinstance(y, tuple) else y


def module_name(model, module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ValueError("not a module of the model")
