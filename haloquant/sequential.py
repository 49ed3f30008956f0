"""Sequential GPTQ: each linear's Hessian from the inputs the already-quantized weights produce.

The calibrate stage's E[xxᵀ] are the float model's inputs. GPTQ as published (and GPTQModel,
llm-compressor) instead quantizes the model in forward order and builds each layer's Hessian
from what the quantized layers before it really feed it, so that a layer compensates the error
of those before. Here: the calibration windows' hidden states are carried from block to block
through the quantized blocks; inside a block, the linears that read one input (q/k/v, gate/up:
the calibrate stage's `input_of` groups) are quantized together, in the order the forward pass
reaches them, each group's Hessian taken with the groups before it already quantized (GPTQ's
"true sequential"). Weights outside the decoder blocks (embedding, head) keep the float
statistics. Memory: the windows' hidden states (windows × seq_len × hidden floats) and one
block's Hessians at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.func import functional_call

from haloquant.blocks import block_inputs, block_output, module_name
from haloquant.formats import QuantFormat
from haloquant.modelio import TensorInfo, decoder_layers
from haloquant.progress import track
from haloquant.streaming import compute_device, on_device

Encoder = Callable[[TensorInfo, torch.Tensor], np.ndarray]  # (tensor, E[xxᵀ] of its input) → block bytes


class _GramOf:
    """E[xxᵀ] of a module's input over every call, accumulated in float64."""

    def __init__(self):
        self.sum, self.count = None, 0

    def __call__(self, _module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        self.sum = x.T @ x if self.sum is None else self.sum + x.T @ x
        self.count += x.shape[0]

    def mean(self) -> torch.Tensor:
        return (self.sum / self.count).float().cpu()


def _forward_order(layer, x: torch.Tensor, kw: dict, modules: dict[str, torch.nn.Module]) -> list[str]:
    """The names of `modules` in the order one forward pass of the block calls them."""
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda _m, _a, n=n: order.append(n) if n not in order else None)
               for n, m in modules.items()]
    try:
        layer(x, **kw)
    finally:
        for h in handles:
            h.remove()
    return order


@torch.no_grad()
def quantize_sequentially(model, ids: torch.Tensor, tensors: list[TensorInfo], formats: dict[str, QuantFormat],
                          input_of: dict[str, str], encode: Encoder, batch: int = 8,
                          on_gram: Callable[[TensorInfo, torch.Tensor], None] | None = None) -> dict[str, np.ndarray]:
    """Block bytes of every tensor in `tensors` that lies in a decoder block, each encoded by
    `encode(t, gram)` with the Hessian of its input as the quantized model computes it.
    `input_of`: module → the key of the input it reads (modules with one key share one input).
    `on_gram`: called with each tensor and its Hessian (tests compare them with the quantized
    model's own)."""
    layers = decoder_layers(model)
    device = compute_device(model)
    x, layer_kwargs = block_inputs(model, ids.to(device), batch)
    out: dict[str, np.ndarray] = {}
    for i, layer in track(enumerate(layers), "sequential GPTQ", "blocks", total=len(layers)):
        with on_device(layer, device):  # a streamed block's float32 weights on the device while it is quantized
            x = _quantize_block(model, layer, x, layer_kwargs[i], [t for t in tensors if t.layer == i], formats,
                                input_of, encode, on_gram, out)
    return out


def _quantize_block(model, layer, x: list[torch.Tensor], kw: list[dict], mine: list[TensorInfo],
                    formats: dict[str, QuantFormat], input_of: dict[str, str], encode: Encoder,
                    on_gram, out: dict[str, np.ndarray]) -> list[torch.Tensor]:
    """Encode the block's tensors (`mine`) group by group into `out`; returns the block's outputs
    with its quantized weights (the next block's inputs)."""
    device = x[0].device
    prefix = f"{module_name(model, layer)}."
    modules = {t.module: model.get_submodule(t.module) for t in mine}
    order = _forward_order(layer, x[0], kw[0], modules) if mine else []
    groups: dict[str, list[TensorInfo]] = {}
    for name in order:
        groups.setdefault(input_of.get(name, name), []).extend(t for t in mine if t.module == name)
    quantized: dict[str, torch.Tensor] = {}  # this block's weights so far, by name inside the block
    for group in groups.values():  # one Hessian per group: its modules read the same tensor
        gram_of = _GramOf()
        handle = modules[group[0].module].register_forward_pre_hook(gram_of)
        try:
            for xb, kb in zip(x, kw):
                functional_call(layer, quantized, (xb,), kb)
        finally:
            handle.remove()
        gram = gram_of.mean()
        for t in group:
            if on_gram is not None:
                on_gram(t, gram)
            out[t.name] = encode(t, gram)
            quantized[t.name[len(prefix):]] = formats[t.name].decode_torch(out[t.name], t.shape, device)
    return [block_output(functional_call(layer, quantized, (xb,), kb)) for xb, kb in zip(x, kw)]
