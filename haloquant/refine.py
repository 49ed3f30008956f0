"""Allocation beyond the separable proxy: refine the solver's formats with measured end-to-end KL.

The solvers minimise Σ cost[tensor, format], each cost measured with that tensor alone quantized.
Errors of different tensors interact (one block's error changes what the next block sees), so the
sum is only a proxy. Starting from the solver's answer, a local search measures the real thing —
the KL of the whole quantized model's output from the float model's on held-out calibration
sequences — for the moves the proxy rates closest to even: one tensor one format up, another one
format down, within the byte budget (and the ONNX budget, where set). A move is kept (first
improvement) only if it lowers the KL by at least `min_z` standard errors of its per-sequence KL
changes, paired over the sequences — on a few thousand tokens most small "gains" are the sample's
noise and do not carry to other text (measured: bench/results/refine_ref-llama-a.md); a move that
is not kept is not tried again until one of its tensors changes. EvoPress searches from scratch this way; starting at
the MILP optimum, a few hundred forward passes suffice.

A trial replays the decoder blocks before the first one the move changes from the last kept run
(haloquant/klprobe.py), and each tensor × format is quantized once, with the quantize stage's own
quantizer (haloquant/quantizer.py: RTN or GPTQ from the float model's statistics, row-scale
correction included; not sequential GPTQ, Scale-Fold or block tuning, which come later and act on
the chosen formats).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Move:
    changes: tuple[tuple[int, str], ...]  # (tensor index, new format)
    proxy: float  # the change of Σ cost the proxy predicts (≥ 0 near a proxy optimum)
    extra_bytes: int


@dataclass
class Refinement:
    picks: list[str]
    kl_start: float
    kl_end: float
    evaluations: int
    accepted: list[dict]
    seconds: float


def candidate_moves(picks: list[str], order: list[list[str]], cost: list[dict[str, float]],
                    size: list[dict[str, int]], slack: int, second: tuple[list[dict[str, int]], int] | None,
                    tried: set) -> list[Move]:
    """Every single upgrade that fits and every (one up, another down) pair that fits, cheapest proxy
    change first. `slack`: bytes left in the budget; `second`: (sizes, slack) of the ONNX budget."""
    ups, downs = [], []
    for i, f in enumerate(picks):
        pos = order[i].index(f)
        if pos + 1 < len(order[i]):
            g = order[i][pos + 1]
            ups.append((i, g, cost[i][g] - cost[i][f], size[i][g] - size[i][f],
                        second[0][i][g] - second[0][i][f] if second else 0))
        if pos > 0:
            g = order[i][pos - 1]
            downs.append((i, g, cost[i][g] - cost[i][f], size[i][f] - size[i][g],
                          second[0][i][f] - second[0][i][g] if second else 0))
    moves = []
    for i, g, dc, db, do in ups:
        if db <= slack and (not second or do <= second[1]):
            key = ((i, g),)
            if key not in tried:
                moves.append(Move(key, dc, db))
        for j, h, dc2, fb, fo in downs:
            if j != i and db - fb <= slack and (not second or do - fo <= second[1]):
                key = ((i, g), (j, h))
                if key not in tried:
                    moves.append(Move(key, dc + dc2, db - fb))
    moves.sort(key=lambda m: (m.proxy, m.extra_bytes))
    return moves


def refine_formats(probe, names: list[str], first_blocks: list[int], cands: list[dict], picks: list[str],
                   budget: int, value: Callable[[int, str], torch.Tensor], evaluations: int, time_limit_s: float,
                   min_z: float, second: tuple[list[dict[str, int]], int] | None = None) -> Refinement:
    """`probe`: a KLProbe made on the float model; `cands[i]`: tensor i's {format: FormatCost};
    `value(i, f)`: tensor i quantized to format f and decoded (float32); `second`: the ONNX sizes of
    every candidate and their budget. Returns the refined picks and what was measured."""
    started = time.perf_counter()
    order = [sorted(cs, key=lambda f: (cs[f].bytes, f)) for cs in cands]
    cost = [{f: c.error for f, c in cs.items()} for cs in cands]
    size = [{f: c.bytes for f, c in cs.items()} for cs in cands]
    picks = list(picks)
    used = sum(size[i][f] for i, f in enumerate(picks))
    onnx_used = sum(second[0][i][f] for i, f in enumerate(picks)) if second else 0
    kl = probe.trial({names[i]: value(i, f) for i, f in enumerate(picks)}, 0)
    probe.accept()
    per_sequence = probe.sequence_kl()
    kl_start, n_eval, accepted, tried = kl, 0, [], set()
    log.info("refine: start KL %.6g (%d tensors, %d bytes of %d)", kl, len(picks), used, budget)
    while n_eval < evaluations and time.perf_counter() - started < time_limit_s:
        onnx_slack = (second[1] - onnx_used) if second else 0
        moves = candidate_moves(picks, order, cost, size, budget - used, (second[0], onnx_slack) if second else None,
                                tried)
        if not moves:
            break
        move = moves[0]
        trial = probe.trial({names[i]: value(i, g) for i, g in move.changes}, min(first_blocks[i] for i, _ in move.changes))
        n_eval += 1
        diff = probe.sequence_kl() - per_sequence
        z = float(-diff.mean() / (diff.std() / len(diff) ** 0.5).clamp_min(1e-30))
        if trial < kl and z >= min_z:
            per_sequence = probe.sequence_kl()
            probe.accept()
            changed = {i for i, _ in move.changes}
            for i, g in move.changes:
                onnx_used += (second[0][i][g] - second[0][i][picks[i]]) if second else 0
                picks[i] = g
            used += move.extra_bytes
            accepted.append({"changes": [{"tensor": names[i], "format": g} for i, g in move.changes],
                             "proxy": move.proxy, "kl": trial, "kl_before": kl, "z": z})
            log.info("refine: %d/%d %s: KL %.6g → %.6g (z %.1f, proxy %+.3g)", n_eval, evaluations,
                     ", ".join(f"{names[i]} → {g}" for i, g in move.changes), kl, trial, z, move.proxy)
            kl = trial
            tried = {k for k in tried if not changed & {i for i, _ in k}}
        else:
            probe.reject()
            tried.add(move.changes)
    assert used <= budget
    return Refinement(picks, kl_start, kl, n_eval, accepted, time.perf_counter() - started)


def decoded_values(infos, weights: dict[str, torch.Tensor], encode: Callable, device) -> Callable[[int, str], torch.Tensor]:
    """value(i, f) for refine_formats: tensor i's bytes in format f made once (by `encode(info, weight,
    format)`, the quantize stage's quantizer) and kept; decoded on each call (decoding is cheap,
    float32 copies of every tried format would not be)."""
    from haloquant.formats import get_format

    cache: dict[tuple[int, str], np.ndarray] = {}

    def value(i: int, f: str) -> torch.Tensor:
        t, fmt = infos[i], get_format(f)
        if (i, f) not in cache:
            cache[(i, f)] = encode(t, weights[t.name], fmt)
        return fmt.decode_torch(cache[(i, f)], t.shape, device)

    return value
