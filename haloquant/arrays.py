"""One implementation of the block fits for numpy (the CPU reference) and torch (CPU or CUDA).

The fits are written against the array API (`array_api_compat`), so the same lines run on numpy
arrays and on torch tensors. Bit-identical bytes on every backend follow from doing only
correctly rounded IEEE float32 operations in the same order: every sum is `sum_last`, which adds
on torch in numpy's pairwise order (torch's own reductions add in another); every √ is
`sqrt32`, correctly rounded; every scalar is a float32 array on the data's device (CUDA divides
by a host scalar as a multiply by its reciprocal, which rounds differently).
"""

from __future__ import annotations

import numpy as np
from array_api_compat import array_namespace, device as device_of


def sum_last(a):
    """Σ over the last axis in the order numpy's add.reduce adds (pairwise_sum: eight running
    sums over blocks of ≤ 128, halves above), so torch on any device gives numpy's float32 sums
    bit for bit; numpy arrays take numpy's own (fast) reduction."""
    if isinstance(a, np.ndarray):
        return a.sum(-1)
    return _pairwise(a)


def _pairwise(a):
    n = a.shape[-1]
    if n < 8:
        res = a[..., 0] * 0
        for i in range(n):
            res = res + a[..., i]
        return res
    if n <= 128:
        acc = a[..., 0:8]
        for i in range(8, n - n % 8, 8):
            acc = acc + a[..., i : i + 8]
        r = [acc[..., j] for j in range(8)]
        res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
        for i in range(n - n % 8, n):
            res = res + a[..., i]
        return res
    half = n // 2
    half -= half % 8
    return _pairwise(a[..., :half]) + _pairwise(a[..., half:])


def sqrt32(a):
    """Correctly rounded float32 √a, as numpy's (torch's CPU kernel is not: it misses the last bit
    for ~0.7 % of inputs; through float64 the rounding is exact)."""
    if isinstance(a, np.ndarray):
        return np.sqrt(a)
    return a.double().sqrt().float()


def scalar(like, value: float):
    """`value` as a float32 0-d array of `like`'s namespace and device."""
    xp = array_namespace(like)
    return xp.asarray(value, dtype=xp.float32, device=device_of(like))


def on_device(a: np.ndarray | None, device):
    """A numpy array as a torch tensor on `device` (None: the numpy array itself)."""
    if a is None or device is None:
        return a
    import torch

    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


def u8(a):
    """Cast to uint8 (values already in range)."""
    xp = array_namespace(a)
    return xp.astype(a, xp.uint8)


def fp16_round(a):
    """float32 → nearest fp16 → float32 (what a stored fp16 scale is)."""
    xp = array_namespace(a)
    return xp.astype(xp.astype(a, xp.float16), xp.float32)


def fp16_bytes(a):
    """(n,) float32 → (n, 2) the little-endian bytes of its fp16."""
    if isinstance(a, np.ndarray):
        return a.astype(np.float16).view(np.uint8).reshape(-1, 2)
    import torch

    return a.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def int8_bytes(a):
    """Integers in [−128, 127] → their int8 bytes as uint8."""
    if isinstance(a, np.ndarray):
        return a.astype(np.int8).view(np.uint8)
    import torch

    return a.to(torch.int8).contiguous().view(torch.uint8)


def fit_device(device):
    """Where a stage's block fits run for its torch device: numpy (None) on the CPU, which is the
    reference and faster there; torch on an accelerator."""
    if device is None:
        return None
    import torch

    device = torch.device(device)
    return None if device.type == "cpu" else device


def to_host(a) -> np.ndarray:
    """Back to numpy from either backend."""
    return a if isinstance(a, np.ndarray) else a.cpu().numpy()


__all__ = ["u8", "fp16_round", "fp16_bytes", "int8_bytes", "array_namespace", "device_of", "sum_last", "sqrt32", "scalar", "on_device", "fit_device", "to_host"]


DEVICE_CHUNK_WEIGHTS = 1 << 25
"""Weights per row chunk where a stage holds float copies of a large tensor on the device: the
output head of a 128k vocabulary is 0.5 G (Llama-3-8B) to 1 G (70B) weights, and a handful of
whole-tensor float32/float64 copies of it (encoder intermediates, decoded weights, errors,
moments) took an H100 to 24 GiB at 8B and 61 GiB at 70B. 2²⁵ weights is 128 MiB per float32 copy;
every tensor of the reference and real models so far is one chunk, so their numbers are unchanged."""


def row_chunks(rows: int, cols: int, budget: int | None = None) -> list[slice]:
    """Contiguous row ranges of a (rows, cols) matrix of at most `budget` (default
    DEVICE_CHUNK_WEIGHTS) weights each, one row at least; a matrix within it is a single chunk."""
    step = max(1, (budget or DEVICE_CHUNK_WEIGHTS) // max(cols, 1))
    return [slice(a, min(rows, a + step)) for a in range(0, rows, step)]
