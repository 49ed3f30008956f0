"""Output-scale correction: each output row's quantized weights rescaled to the float row's output.

A quantizer fits each block's scale to the block's own weights (weighted by E[x²] at most). The
row's output ŵ·x is then off by a factor that the input's correlations decide: the least-squares
factor α_r = ⟨w_r, ŵ_r⟩_G / ⟨ŵ_r, ŵ_r⟩_G in the metric of the input's Gram matrix G = E[xxᵀ]
makes the quantized row's output match the float row's over the calibration data as closely as a
scale can (Hubara et al.'s statistics correction, for the second moment: a layer's output scale).
Every block scale of a llama.cpp type is an fp16 field that scales the whole decoded block (d, and
dmin/m where the type has a min: `Codec.scale_fields`), so α_r is folded into the row's bytes and
unmodified llama.cpp runs the result: no new tensor, no new kernel. A row keeps its old bytes
where the rounded fp16 scales do not lower its error, so the output error never grows.
"""

from __future__ import annotations

import numpy as np
import torch

from haloquant.arrays import row_chunks

ALPHA_RANGE = (0.5, 2.0)  # a correction beyond this is no correction: the row is left as it is


def rescalable(fmt) -> bool:
    return fmt.codec is not None and (bool(fmt.codec.scale_fields) or fmt.codec.packed_scale is not None)


def scaled_bytes(fmt, data: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """`data`'s rows with every block's scale fields multiplied by the row's α (rounded to fp16)."""
    rows = data.shape[0]
    blocks = np.array(data, dtype=np.uint8).reshape(rows, -1, fmt.type_size)
    for off in fmt.codec.scale_fields:
        field = np.ascontiguousarray(blocks[..., off:off + 2]).view(np.float16)
        blocks[..., off:off + 2] = (field.astype(np.float32) * alpha[:, None, None]).astype(np.float16).view(np.uint8)
    if fmt.codec.packed_scale is not None:
        read, write = fmt.codec.packed_scale
        write(blocks, (read(blocks) * alpha[:, None]).astype(np.float16))
    return blocks.reshape(rows, -1)


def correct_row_scales(fmt, data: np.ndarray, weight: torch.Tensor, gram: torch.Tensor,
                       device="cpu") -> tuple[np.ndarray, float, float]:
    """(bytes, output error before, after): Σ_r (w_r − ŵ_r)ᵀ G (w_r − ŵ_r) in float64, where ŵ
    decodes the bytes; each row with the least-squares scale where that lowers its error. Formats
    without scale fields (floats) come back as they are."""
    if not rescalable(fmt):
        return data, 0.0, 0.0
    g = gram.to(device, torch.float64)
    out = np.array(data, dtype=np.uint8).reshape(data.shape[0], -1)
    before = after = 0.0
    for part in row_chunks(*weight.shape):
        shape = (part.stop - part.start, weight.shape[1])
        w = weight[part].to(device, torch.float64)
        q = fmt.decode_torch(out[part], shape, device).double()
        qg, d = q @ g, w - q
        num, den = (qg * w).sum(1), (qg * q).sum(1)
        e0 = ((d @ g) * d).sum(1)  # (w − ŵ)ᵀG(w − ŵ), row by row
        alpha = torch.where(den > 0, num / den.clamp_min(1e-300), torch.ones_like(den))
        alpha = torch.where((alpha >= ALPHA_RANGE[0]) & (alpha <= ALPHA_RANGE[1]), alpha, torch.ones_like(alpha))
        trial = scaled_bytes(fmt, out[part], alpha.float().cpu().numpy())
        d = w - fmt.decode_torch(trial, shape, device).double()
        e1 = ((d @ g) * d).sum(1)
        better = (e1 < e0) & torch.isfinite(e1)
        keep = better.cpu().numpy()
        out[part][keep] = trial[keep]
        before += float(e0.sum())
        after += float(torch.where(better, e1, e0).sum())
    return out, before, after
