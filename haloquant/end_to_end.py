"""End-to-end tuning: the quantized model's codes and float tensors against the float model's
next-token distributions.

Block tuning (haloquant/reconstruct.py) matches each block's output in the mean-squared sense, every
hidden direction alike; the logits are not alike in every direction, and what a user measures
(perplexity, KL from the float model) is at the logits. Here, once every tensor is encoded, tuned
block by block and statistics-corrected, the whole quantized model is tuned on calibration windows
against

    KL(p_float(· | x) ‖ p_quant(· | x)),   averaged over the windows' tokens,

the float model (the quantize stage's own, folds applied) giving the targets on the fly. Codes of
the decoder linears move as in block tuning (`GridWeight`: an offset within ±½ step per weight,
signed-gradient steps, a straight-through estimator, the fitted scales kept and the codes written
back into the same block bytes), but the offsets start at the codes themselves: a code moves only
once its steps have mostly agreed. (Starting them at the float weights' positions, as block tuning
does from what GPTQ rounded, undid GPTQ's error compensation: every variant measured raised the
held-out KL.) The float tensors the GGUF stores as float32 (norm weights, biases) move by Adam.
The lattice i-quants and the tensors outside the decoder blocks (embedding, head) take part with
their decoded values. A few calibration windows are held out of the steps:
the tuned state is kept only if it lowers their KL, else everything stays as it came.

Memory: the whole model on one device, plus about 25 bytes per tunable weight (its offset and
gradient, start position, scale, zero point, starting code) and the logits of a batch; a streamed
model is refused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from haloquant import HaloquantError
from haloquant.blocks import module_name
from haloquant.formats import QuantFormat
from haloquant.modelio import decoder_layers
from haloquant.progress import track
from haloquant.reconstruct import FixedWeight, tunable
from haloquant.streaming import place, streamed


@dataclass(frozen=True)
class EndToEndSettings:
    iters: int = 0  # steps over the whole model; 0 = off
    lr: float | None = None  # code offset step per iteration, decayed linearly to 0; None = 1 / iters
    float_lr: float = 1e-4  # Adam's step for norm weights and biases
    batch: int = 8  # calibration windows per step
    holdout: int = 8  # windows kept out of the steps, on which the keep decision is made
    seed: int = 0
    amp: bool = True  # on CUDA, the steps in bfloat16 autocast (targets and the keep decision in float32)


def tune_end_to_end(model, ids: torch.Tensor, encoded: dict[str, np.ndarray], formats: dict[str, QuantFormat],
                    floats: dict[str, torch.Tensor], settings: EndToEndSettings, device,
                    log=None) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor], dict]:
    """(block bytes with tuned codes, every float tensor — norm weights, biases — by parameter name,
    a report). `floats`: float tensors already changed (statistics correction); the model's own
    values for the others."""
    if streamed(model):
        raise HaloquantError("quantize.end_to_end.iters: end-to-end tuning needs the whole model on one device; "
                             "set model.stream to false or end_to_end.iters to 0")
    if ids.shape[0] < 2:
        raise HaloquantError("quantize.end_to_end: needs at least 2 calibration windows (one held out)")
    started = time.perf_counter()
    device = torch.device(device)
    amp = settings.amp and device.type == "cuda"
    model = place(model, device).requires_grad_(False)
    gen = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(ids.shape[0], generator=gen)
    n_hold = min(settings.holdout, ids.shape[0] // 2)
    held, train = ids[order[:n_hold]].to(device), ids[order[n_hold:]].to(device)

    params = dict(model.named_parameters())
    in_blocks = tuple(f"{module_name(model, layer)}." for layer in decoder_layers(model))
    weights = {}
    for n, data in encoded.items():
        shape = tuple(params[n].shape)
        if n.startswith(in_blocks) and not formats[n].is_float:
            weights[n] = tunable(formats[n], data, shape, device, None)  # offsets start at the codes themselves
        else:
            weights[n] = FixedWeight(formats[n], data, shape, device)
    start = {n: floats[n].float() if n in floats else p.detach().float().cpu()
             for n, p in params.items() if p.ndim != 2}
    tuned = {n: v.to(device).clone().requires_grad_(True) for n, v in start.items()}
    grids = [w for w in weights.values() if not isinstance(w, FixedWeight)]
    opt = torch.optim.Adam(list(tuned.values()), lr=settings.float_lr) if tuned else None
    lr0 = settings.lr if settings.lr is not None else 1.0 / max(settings.iters, 1)

    def quantized(hard: bool) -> dict[str, torch.Tensor]:
        return {**{n: w.weight(hard) for n, w in weights.items()}, **tuned}

    def kl(x: torch.Tensor, state: dict[str, torch.Tensor], autocast: bool) -> torch.Tensor:
        with torch.no_grad():
            target = F.log_softmax(model(x, use_cache=False).logits.float(), -1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = functional_call(model, state, (x,), {"use_cache": False}).logits
        mine = F.log_softmax(logits.float(), -1)
        return (target.exp() * (target - mine)).sum(-1).mean()

    def held_kl() -> float:
        with torch.no_grad():
            state = quantized(True)
            return float(sum(kl(held[s:s + settings.batch], state, False) * len(held[s:s + settings.batch])
                             for s in range(0, len(held), settings.batch)) / len(held))

    before = held_kl()
    for it in track(range(settings.iters), "end-to-end tuning", "steps", total=settings.iters):
        x = train[torch.randint(len(train), (settings.batch,), generator=gen)]
        kl(x, quantized(False), amp).backward()
        lr = lr0 * (1 - it / settings.iters)
        for g in grids:
            g.step(lr)
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    after = held_kl()
    keep = after < before
    if not keep:
        for g in grids:
            g.reset()
    out = {n: w.tuned_data() for n, w in weights.items()} if keep else dict(encoded)
    result = {n: (v.detach().cpu() if keep else start[n]) for n, v in tuned.items()}
    changed = sum(int((g.codes() != g.q0).sum()) for g in grids) if keep else 0
    report = {"kl_before": before, "kl_after": after, "kept": keep, "codes_changed": changed,
              "weights": sum(g.q0.numel() for g in grids), "held_out_windows": n_hold,
              "seconds": time.perf_counter() - started}
    if log:
        log(f"end-to-end tuning: held-out KL {before:.5g} → {after:.5g}"
            + ("" if keep else " (starting state kept)") + f", {changed} codes changed")
    return out, result, report
