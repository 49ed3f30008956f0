"""Block-output reconstruction on the GGUF's own grids (AutoRound's signed-gradient rounding).

GPTQ compensates each weight column's rounding error from one layer's input statistics; it does
not see how the errors of q, k, v, o, gate, up and down combine in the block's output. Here each
decoder block's rounding decisions are tuned against that output: for every quantized linear of
block i the per-weight offset V ∈ [−½, ½] moves the continuous code position u₀ + V of the
weights the starting codes were rounded from (GPTQ's error-compensated weights, or the float
weights for RTN), so that each code can move one step either way; the weight is the format's level at round(q₀ + V) with the
block's fitted scales and zero points (a straight-through estimator of the rounding, linear
between the table's levels for the IQ4 types), and V follows the sign of the gradient of

    ‖block_q(X_q) − block(X)‖²,

X being the float model's input of the block and X_q what the already-quantized blocks produce
from the same calibration windows (so later blocks learn to correct earlier ones). Scales and
mins are the ones the encoder fitted: only codes change, and they are written back into the
same block bytes (`QuantFormat.with_codes`), so the result is still exact llama.cpp data. A
block's tuned codes are kept only if they lower the block's output error on the whole
calibration set; otherwise its starting codes stay.

Memory: the float and quantized-path activations of the calibration windows (2 × windows ×
seq_len × hidden floats) and one block's parameters, gradients and offsets at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from haloquant.blocks import block_inputs, block_output, module_name
from haloquant.formats import QuantFormat
from haloquant.modelio import decoder_layers
from haloquant.progress import track
from haloquant.streaming import on_device, place


@dataclass(frozen=True)
class TuneSettings:
    iters: int = 200  # signed-gradient steps per block
    lr: float | None = None  # step of V per iteration, decayed linearly to 0; None = 1 / iters
    batch: int = 8  # calibration windows per step
    seed: int = 0
    amp: bool = True  # on CUDA, the steps' forward and backward in bfloat16 (the keep decision stays float32)


class GridWeight:
    """A weight as a function of its code offsets V: (level(round(u₀ + V)) − zero) · scale, where
    u₀ is the continuous code position of the weights the codes were rounded from (GPTQ's
    error-compensated weights, or the float weights), held within half a step of the starting
    codes so that V = 0 gives exactly them. Starting from integer positions instead would move
    every offset in lockstep under the sign of a constant gradient."""

    def __init__(self, fmt: QuantFormat, data: np.ndarray, shape: tuple[int, int], device,
                 rounded_from: np.ndarray | None = None):
        a = fmt.affine_blocks(data, shape)
        g = a.q.shape[-1]
        rep = lambda x: np.repeat(np.asarray(x, np.float32), g, axis=1)  # noqa: E731
        dev = lambda x: torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)  # noqa: E731
        scale, zero = rep(a.scale), rep(a.zero)
        frozen = rep(a.constant) > 0 if a.constant is not None else np.zeros(shape, bool)
        frozen |= scale == 0
        q0 = a.q.reshape(shape).astype(np.float32)
        levels = np.arange(fmt.max_code + 1, dtype=np.float32) if a.values is None else np.asarray(a.values, np.float32)
        u0 = q0
        if rounded_from is not None:
            value = np.where(frozen, 0.0, rounded_from / np.where(frozen, 1.0, scale)) + zero
            position = np.interp(value, levels, np.arange(len(levels), dtype=np.float32))  # value → code position
            u0 = q0 + np.clip(position - q0, -0.499, 0.499)
        self.fmt, self.data, self.shape = fmt, data, shape
        self.scale, self.zero, self.q0, self.u0 = dev(scale), dev(zero), dev(q0), dev(u0)
        self.frozen = torch.from_numpy(frozen).to(device)
        self.levels = dev(levels)
        self.qmax = len(levels) - 1
        self.V = torch.zeros(shape, device=device, requires_grad=True)

    def _position(self, V: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.u0 + V, 0, self.qmax)

    def codes(self) -> torch.Tensor:
        u = self._position(self.V.detach())
        return torch.where(self.frozen, self.q0, torch.floor(u + 0.5).clamp(max=self.qmax))

    def weight(self, hard: bool = False) -> torch.Tensor:
        level = self.levels[self.codes().long()]
        if not hard:  # forward: the rounded level; backward: the slope between the levels around u
            u = self._position(self.V)
            lo = torch.floor(u).clamp(max=self.qmax - 1)
            soft = torch.lerp(self.levels[lo.long()], self.levels[lo.long() + 1], u - lo)
            level = torch.where(self.frozen, level, soft + (level - soft).detach())
        return (level - self.zero) * self.scale

    def step(self, lr: float) -> None:
        with torch.no_grad():
            self.V -= lr * torch.sign(self.V.grad) * (~self.frozen)
            self.V.clamp_(-0.5, 0.5)
            self.V.grad = None

    def reset(self) -> None:
        with torch.no_grad():
            self.V.zero_()

    def tuned_data(self) -> np.ndarray:
        return self.fmt.with_codes(self.data, self.shape, self.codes().cpu().numpy().astype(np.uint8))


class FixedWeight:
    """A quantized weight whose codes block tuning leaves as they are (the lattice i-quants: no
    per-weight code to move): its decoded value takes part in the block's quantized output."""

    def __init__(self, fmt: QuantFormat, data: np.ndarray, shape: tuple[int, int], device):
        self.data = data
        self.value = fmt.decode_torch(data, shape, device)
        self.q0 = torch.zeros(0, device=device)

    def codes(self) -> torch.Tensor:
        return self.q0

    def weight(self, hard: bool = False) -> torch.Tensor:
        return self.value

    def step(self, lr: float) -> None:
        pass

    def reset(self) -> None:
        pass

    def tuned_data(self) -> np.ndarray:
        return self.data


def tunable(fmt: QuantFormat, data: np.ndarray, shape: tuple[int, int], device, rounded_from: np.ndarray | None):
    if fmt.lattice is not None:
        return FixedWeight(fmt, data, shape, device)
    return GridWeight(fmt, data, shape, device, rounded_from)


def tune_blocks(model, ids: torch.Tensor, encoded: dict[str, np.ndarray], formats: dict[str, QuantFormat],
                settings: TuneSettings, device, rounded: dict[str, np.ndarray] | None = None,
                log=None) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Tuned block bytes for every quantized weight inside a decoder block (others unchanged),
    and per block: output error before and after, and whether the tuned codes were kept.
    `rounded`: per weight, what its codes were rounded from (GPTQ's compensated weights); the
    model's own weights where absent."""
    rounded = rounded or {}
    device = torch.device(device)
    amp = settings.amp and device.type == "cuda"
    model = place(model, device).requires_grad_(False)
    ids = ids.to(device)
    gen = torch.Generator().manual_seed(settings.seed)
    lr0 = settings.lr if settings.lr is not None else 1.0 / max(settings.iters, 1)
    x_float, layer_kwargs = block_inputs(model, ids, settings.batch)
    x_quant = [x.clone() for x in x_float]
    out = dict(encoded)
    report = []
    layers = decoder_layers(model)
    for i, layer in track(enumerate(layers), "block tuning", "blocks", total=len(layers)):
        with on_device(layer, device):  # a streamed block: its float32 weights on the device for its tuning
            prefix = f"{module_name(model, layer)}."
            grids = {n: tunable(formats[prefix + n], encoded[prefix + n], tuple(p.shape), device,
                                 rounded[prefix + n] if prefix + n in rounded else p.detach().float().cpu().numpy())
                     for n, p in layer.named_parameters() if prefix + n in encoded and not formats[prefix + n].is_float}
            x_float, x_quant, entry = _tune_block(layer, grids, x_float, x_quant, layer_kwargs[i], settings, gen,
                                                  lr0, amp)
        for n, g in grids.items():
            out[prefix + n] = g.tuned_data() if entry["kept"] else encoded[prefix + n]
        report.append({"layer": i, **entry})
        if log:
            log(f"block {i}: output error {entry['error_before']:.4g} → {entry['error_after']:.4g}"
                + ("" if entry["kept"] else " (starting codes kept)"))
    return out, report


def _tune_block(layer, grids: dict[str, GridWeight | FixedWeight], x_float: list, x_quant: list, kw: list[dict],
                settings: TuneSettings, gen: torch.Generator, lr0: float, amp: bool) -> tuple[list, list, dict]:
    """Tune one block's grids (in place; reset where tuning did not lower the block's output error
    over all windows). Returns the next block's float and quantized-path inputs and the report."""
    device = x_quant[0].device
    with torch.no_grad():
        target = [block_output(layer(x, **k)) for x, k in zip(x_float, kw)]

    def block_error() -> float:
        with torch.no_grad():
            w = {n: g.weight(True) for n, g in grids.items()}
            return sum(float(F.mse_loss(block_output(functional_call(layer, w, (x,), k)), y, reduction="sum"))
                       for x, k, y in zip(x_quant, kw, target))

    before = block_error()
    for it in range(settings.iters if any(isinstance(g, GridWeight) for g in grids.values()) else 0):
        b = int(torch.randint(len(x_quant), (1,), generator=gen))
        w = {n: g.weight() for n, g in grids.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            y = block_output(functional_call(layer, w, (x_quant[b],), kw[b]))
        F.mse_loss(y.float(), target[b]).backward()
        lr = lr0 * (1 - it / settings.iters)
        for g in grids.values():
            g.step(lr)
    after = block_error()
    keep = after < before
    if not keep:
        for g in grids.values():
            g.reset()
    with torch.no_grad():  # the next block's quantized-path input
        w = {n: g.weight(True) for n, g in grids.items()}
        x_next = [block_output(functional_call(layer, w, (x,), k)) for x, k in zip(x_quant, kw)]
    changed = sum(int((g.codes() != g.q0).sum()) for g in grids.values()) if keep else 0
    return target, x_next, {"error_before": before, "error_after": after, "kept": keep, "codes_changed": changed,
                            "weights": sum(g.q0.numel() for g in grids.values())}
