"""The Hessians E[xxᵀ] of the decoder blocks' linear inputs, made one block at a time when asked for.

A d×d matrix per linear input is what GPTQ, the sensitivity errors, Scale-Fold's search and the SAC
features need — and, kept for a whole model, what does not scale: float32 Gram matrices of every
input of Llama-3-8B are 33 GB. So the calibrate stage keeps only per-channel statistics (and the
output head's one matrix), and a stage that needs a block's Hessians gets them from this class:
the calibration windows' hidden states are carried through the float blocks, in order, and the
Hessians of the block asked for are accumulated, handed out, and dropped when the next block is
asked for. Consumers that ask in model order (every stage does) pay one forward pass in all and
hold one block's matrices; asking for an earlier block restarts from block 0 (correct, slower).
The accumulation is the calibrate stage's (float64 sums over the same micro-batches, then float32).
"""

from __future__ import annotations

import torch

from haloquant.blocks import block_inputs, block_output, module_name
from haloquant.modelio import decoder_layers
from haloquant.streaming import compute_device, on_device

MICRO_BATCH = 8  # the calibrate stage's micro-batch: the same sums in the same order


class LayerGrams:
    def __init__(self, model, ids: torch.Tensor, input_of: dict[str, str], device: torch.device | None = None):
        """`input_of`: module → the key of the input it reads (the calibrate report's); `device`: where
        the blocks run (each block is put there for its pass: haloquant/streaming.py); default the model's."""
        self.model, self.ids = model, ids
        self.layers = decoder_layers(model)
        self.device = torch.device(device) if device is not None else compute_device(model)
        prefixes = [module_name(model, layer) + "." for layer in self.layers]
        self.keys: list[list[str]] = [sorted({k for k in input_of.values() if k.startswith(p)}) for p in prefixes]
        self._layer_of = {k: i for i, ks in enumerate(self.keys) for k in ks}
        self._held: tuple[int, dict[str, torch.Tensor]] | None = None
        self._x: list[torch.Tensor] | None = None  # hidden states entering block self._next
        self._kw: list[list[dict]] = []
        self._next = 0
        self.passes = 0  # forward passes started from block 0 (1 when asked in order)

    def has(self, key: str) -> bool:
        return key in self._layer_of

    def gram(self, key: str) -> torch.Tensor:
        """E[xxᵀ] (float32, on the device the blocks run on: a consumer on that device takes it as
        it is, without the 0.8 GB round trip of a Llama-3-8B ffn_down Hessian) of the input `key` names."""
        i = self._layer_of[key]
        if self._held is None or self._held[0] != i:
            self._held = (i, self._advance_to(i))
        return self._held[1][key]

    @torch.no_grad()
    def _advance_to(self, i: int) -> dict[str, torch.Tensor]:
        if self._x is None or i < self._next:
            x, self._kw = block_inputs(self.model, self.ids, MICRO_BATCH)
            self._x = [h.to(self.device) for h in x]
            self._kw = [[_to(kw, self.device) for kw in per_layer] for per_layer in self._kw]
            self._next = 0
            self.passes += 1
        grams: dict[str, torch.Tensor] = {}
        while self._next <= i:
            j, layer = self._next, self.layers[self._next]
            sums: dict[str, list] = {}
            handles = []
            if j == i:
                modules = dict(layer.named_modules())
                prefix = module_name(self.model, layer) + "."
                for key in self.keys[j]:
                    sums[key] = [None, 0]
                    handles.append(modules[key[len(prefix):]].register_forward_pre_hook(_accumulate(sums[key])))
            try:
                with on_device(layer, self.device):
                    self._x = [block_output(layer(xb, **kw)) for xb, kw in zip(self._x, self._kw[j])]
            finally:
                for h in handles:
                    h.remove()
            self._next += 1
            grams = {k: (s / n).float() for k, (s, n) in sums.items()}
        return grams


def _accumulate(acc: list):
    def hook(_module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        acc[0] = x.T @ x if acc[0] is None else acc[0] + x.T @ x
        acc[1] += x.shape[0]
    return hook


def _to(kw: dict, device: torch.device) -> dict:
    def move(v):
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, tuple):
            return tuple(move(u) for u in v)
        return v
    return {k: move(v) for k, v in kw.items()}
