"""llama.cpp's non-linear 4-bit types IQ4_NL (blocks of 32, 4.5 bits per weight) and IQ4_XS
(super-blocks of 256 with 6-bit block scales, 4.25 bits per weight), vectorised.

Both store, per 32 weights, 4-bit indices into one fixed 16-value table (`KVALUES`, denser near
zero, where weights are) times a block scale. The encoder follows ggml's
`quantize_row_iq4_nl_impl`: a weighted least-squares scale per block, tried from 15 starting
points, then (IQ4_XS) the block scales rounded onto a 6-bit grid under an fp16 super-scale and
every index re-chosen against the scale actually stored. Unlike ggml, which re-chooses indices
against the unrounded fp32 scale, it uses the stored fp16 one: what the decoder multiplies by.
"""

from __future__ import annotations

import numpy as np

KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)
QK_K = 256
_BLOCK = 32
_NTRY = 7
_EPS = 1e-15
_CHUNK = 4096  # super-blocks per vectorised pass


def nearest_index(x: np.ndarray) -> np.ndarray:
    """Index of the nearest table value (ggml best_index_int8: ties go to the larger value)."""
    i = np.clip(np.searchsorted(KVALUES, x, side="left"), 1, 15)
    lower = x - KVALUES[i - 1] < KVALUES[i] - x
    return np.where(x <= KVALUES[0], 0, np.where(x >= KVALUES[15], 15, i - lower)).astype(np.uint8)


def _weights(x: np.ndarray, imp: np.ndarray | None, super_size: int) -> np.ndarray:
    """ggml's per-weight fit weights: imatrix · sqrt(σ² + x²) with σ² = 2·mean(x²) over the super-block,
    or x² without an imatrix."""
    if imp is None:
        return x * x
    sb = x.reshape(-1, super_size)
    sigma2 = 2 * (sb * sb).sum(-1, keepdims=True) / super_size
    return (imp.reshape(-1, super_size) * np.sqrt(sigma2 + sb * sb)).reshape(x.shape)


def _fit(x: np.ndarray, w: np.ndarray, inv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per block (rows of x): index every weight at inverse scale `inv`, then the weighted
    least-squares scale for those indices; returns (scale, Σ w·q·x, Σ w·q²)."""
    idx = nearest_index(x * inv[:, None])
    q = KVALUES[idx]
    sumqx = (w * q * x).sum(-1)
    sumq2 = (w * q * q).sum(-1)
    d = np.where(sumq2 > 0, sumqx / np.where(sumq2 > 0, sumq2, 1), 0)
    return d, sumqx, sumq2


def block_scales(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per 32-block float scale (ggml's search over 15 inverse scales around −max/127)."""
    amax_i = np.abs(x).argmax(-1)
    mx = np.take_along_axis(x, amax_i[:, None], -1)[:, 0]
    ok = np.abs(mx) >= _EPS
    safe = np.where(ok, mx, 1.0)
    d, sumqx, _ = _fit(x, w, -KVALUES[0] / safe)  # first guess: the largest |x| onto −127
    best = d * sumqx
    for itry in range(-_NTRY, _NTRY + 1):
        dt, sqx, sq2 = _fit(x, w, (itry + KVALUES[0]) / safe)
        better = (sq2 > 0) & (sqx * sqx > best * sq2)
        d = np.where(better, dt, d)
        best = np.where(better, dt * sqx, best)
    return np.where(ok, d, 0.0).astype(np.float32)


def _pack(idx: np.ndarray) -> np.ndarray:
    """(N, 32) indices → (N, 16) bytes: element j low nibble, element j+16 high nibble."""
    return (idx[:, :16] | (idx[:, 16:] << 4)).astype(np.uint8)


def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _inverse(v: np.ndarray) -> np.ndarray:
    """1/v, and 0 where v is 0 (an all-zero block decodes to zeros whatever its indices)."""
    nz = v != 0
    return np.where(nz, 1 / np.where(nz, v, 1), 0)


def _encode_nl(x: np.ndarray, imp: np.ndarray | None) -> np.ndarray:
    x = x.reshape(-1, _BLOCK)
    w = _weights(x, imp, _BLOCK)
    d = _fp16(block_scales(x, w))
    df = d.astype(np.float32)
    idx = nearest_index(x * _inverse(df)[:, None])
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), _pack(idx)], axis=1)


def _encode_xs(x: np.ndarray, imp: np.ndarray | None) -> np.ndarray:
    n = x.shape[0]
    xb = x.reshape(-1, _BLOCK)
    w = _weights(x, imp, QK_K).reshape(-1, _BLOCK)
    sc = block_scales(xb, w).reshape(n, QK_K // _BLOCK)
    mx = np.take_along_axis(sc, np.abs(sc).argmax(-1)[:, None], -1)[:, 0]
    d = _fp16(-mx / 32)
    df = d.astype(np.float32)
    ls = np.clip(np.rint(_inverse(df)[:, None] * sc), -32, 31).astype(np.int32)
    dl = (df[:, None] * ls).reshape(-1)
    idx = nearest_index(xb * _inverse(dl)[:, None])
    u = (ls + 32).astype(np.uint16)  # (n, 8) 6-bit block scales
    scales_l = ((u[:, 0::2] & 0xF) | ((u[:, 1::2] & 0xF) << 4)).astype(np.uint8)
    scales_h = np.bitwise_or.reduce((u >> 4) << (2 * np.arange(8, dtype=np.uint16)), axis=-1).astype(np.uint16)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), scales_h[:, None].view(np.uint8), scales_l,
                           _pack(idx).reshape(n, -1)], axis=1)


def encode_iq4(name: str, weight: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """(rows, cols) float32 → (rows, bytes per row) uint8 in ggml's IQ4_NL / IQ4_XS layout."""
    rows, cols = weight.shape
    size = QK_K if name == "IQ4_XS" else _BLOCK
    x = np.ascontiguousarray(weight, np.float32).reshape(-1, size)
    imp = None
    if importance is not None:
        imp = np.broadcast_to(np.asarray(importance, np.float32).reshape(1, cols // size, size),
                              (rows, cols // size, size)).reshape(-1, size)
    enc = _encode_xs if name == "IQ4_XS" else _encode_nl
    step = _CHUNK * (QK_K // size)
    parts = [enc(x[i : i + step], None if imp is None else imp[i : i + step]) for i in range(0, len(x), step)]
    return np.concatenate(parts).reshape(rows, -1)
