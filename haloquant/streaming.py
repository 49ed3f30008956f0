"""Decoder blocks streamed to the compute device one at a time (layer-streamed execution).

A model of 8 B parameters is 32 GB in float32: more than a 24 GB GPU or this machine's memory.
Streamed, its decoder blocks wait on the host in the checkpoint's own dtype (bf16/fp16: half of
float32) while everything else — embedding, final norm, head, rotary tables — sits on the device
in float32. A block's weights become float32 tensors on the device while the block runs, and are
dropped when it returns, so the device holds one block's weights at a time. The arithmetic is the
float32 arithmetic of a resident model: the numbers are the same, only where weights wait differs.

- `on_device(block, device)`: the block's parameters and buffers as float32 on `device` for a
  `with` (reentrant). A parameter with a `source` (a callable giving its float32 value, e.g.
  decoded from quantized bytes) is made from that instead of its stored tensor.
- `stream_blocks(model, device)`: every decoder block gets a forward pre-hook and hook that open
  and close `on_device` around its call, so `model(ids)` works as before. A block whose forward
  was replaced for the call (haloquant.blocks' recorders and replays set an instance `forward`
  that reads no weight) is not moved.
- `compute_device(model)`: where a model's inputs go (its embedding's device).
What was assigned to a parameter's `.data` between calls (a fold, a swapped weight) is what the
next call moves: nothing is cached across calls.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Iterator

import torch

Source = Callable[[torch.device], torch.Tensor]  # → the parameter's float32 value on that device

_SOURCES = "_haloquant_sources"  # on a block: {parameter name: Source}
_DEPTH = "_haloquant_on_device"  # on a block: how many on_device contexts are open
_STREAMED = "_haloquant_streamed"  # on a model: the device its streamed blocks run on


def compute_device(model) -> torch.device:
    """The device a model's inputs go to: its token embedding's (the first thing that runs)."""
    return model.get_input_embeddings().weight.device


def streamed(model) -> bool:
    return getattr(model, _STREAMED, None) is not None


def set_source(block: torch.nn.Module, name: str, source: Source | None) -> None:
    """Make parameter `name` (relative to `block`) come from `source` whenever the block is put
    on a device; None: from its stored tensor again."""
    sources = block.__dict__.setdefault(_SOURCES, {})
    if source is None:
        sources.pop(name, None)
    else:
        sources[name] = source


@contextlib.contextmanager
def on_device(block: torch.nn.Module, device: torch.device | str) -> Iterator[torch.nn.Module]:
    """The block's parameters and floating buffers as float32 tensors on `device` for the `with`;
    afterwards exactly what they were (their stored tensors, wherever those live)."""
    device = torch.device(device)
    if getattr(block, _DEPTH, 0):
        setattr(block, _DEPTH, getattr(block, _DEPTH) + 1)
        try:
            yield block
        finally:
            setattr(block, _DEPTH, getattr(block, _DEPTH) - 1)
        return
    sources: dict[str, Source] = block.__dict__.get(_SOURCES, {})
    stored = []
    for name, t in itertools.chain(block.named_parameters(), block.named_buffers()):
        if name in sources:
            value = sources[name](device)
        elif t.is_floating_point():
            value = t.data.to(device=device, dtype=torch.float32)
        else:
            value = t.data.to(device)
        if value is not t.data:
            stored.append((t, t.data))
            t.data = value
    setattr(block, _DEPTH, 1)
    try:
        yield block
    finally:
        setattr(block, _DEPTH, 0)
        for t, data in stored:
            t.data = data


def _replaced(block: torch.nn.Module) -> bool:
    """A forward set on the instance for one call (a recorder or a replay): it reads no weight."""
    return "forward" in block.__dict__


def stream_blocks(model, device: torch.device | str):
    """Stream `model`'s decoder blocks to `device` (see the module doc); the rest of the model is
    moved there in float32. The blocks stay where they are, in their dtype."""
    from haloquant.modelio import decoder_layers

    device = torch.device(device)
    layers = decoder_layers(model)
    in_blocks = {id(t) for t in itertools.chain(layers.parameters(), layers.buffers())}
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) not in in_blocks:
            t.data = t.data.to(device=device, dtype=torch.float32 if t.is_floating_point() else t.dtype)
    for layer in layers:
        contexts: list[contextlib.ExitStack] = []

        def enter(block, _args, contexts=contexts):
            stack = contextlib.ExitStack()
            if not _replaced(block):
                stack.enter_context(on_device(block, device))
            contexts.append(stack)

        def leave(_block, _args, _out, contexts=contexts):
            contexts.pop().close()

        layer.register_forward_pre_hook(enter)
        layer.register_forward_hook(leave, always_call=True)
    setattr(model, _STREAMED, device)
    return model


def place(model, device: torch.device | str):
    """The model ready to compute on `device`: a resident model is moved there; a streamed one
    stays as it is (its blocks come to its device as they run)."""
    return model if streamed(model) else model.to(device)
