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
from gguf import GGMLQuantizationType

from haloquant.arrays import (array_namespace, device_of, fp16_bytes, fp16_round, on_device, scalar, sqrt32,
                              sum_last, to_host, u8)
from haloquant.codec import AffineBlocks, Codec, register
from haloquant.legacyquants import f16_at, nibbles, pack_nibbles

KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)
QK_K = 256
_BLOCK = 32
_NTRY = 7
_EPS = 1e-15
_CHUNK = 4096  # super-blocks per vectorised pass


def _table(like):
    """KVALUES in `like`'s namespace and device."""
    xp = array_namespace(like)
    return xp.asarray(KVALUES, dtype=like.dtype, device=device_of(like))


def nearest_index(x):
    """Index of the nearest table value (ggml best_index_int8: ties go to the larger value);
    numpy or torch (int64 indices), the same on either."""
    xp = array_namespace(x)
    kv = _table(x)
    i = xp.clip(xp.searchsorted(kv, xp.reshape(x, (-1,)), side="left"), 1, 15)
    i = xp.reshape(i, x.shape)
    lower = xp.astype(x - kv[i - 1] < kv[i] - x, i.dtype)
    return xp.where(x <= kv[0], xp.zeros_like(i), xp.where(x >= kv[15], xp.full_like(i, 15), i - lower))


def _weights(x, imp, super_size: int):
    """ggml's per-weight fit weights: imatrix · sqrt(σ² + x²) with σ² = 2·mean(x²) over the super-block,
    or x² without an imatrix."""
    if imp is None:
        return x * x
    sb = x.reshape(-1, super_size)
    sigma2 = (scalar(x, 2.0) * sum_last(sb * sb) / scalar(x, super_size))[:, None]
    return (imp.reshape(-1, super_size) * sqrt32(sigma2 + sb * sb)).reshape(x.shape)


def _fit(x, w, inv):
    """Per block (rows of x): index every weight at inverse scale `inv`, then the weighted
    least-squares scale for those indices; returns (scale, Σ w·q·x, Σ w·q²)."""
    xp = array_namespace(x)
    q = _table(x)[nearest_index(x * inv[:, None])]
    sumqx = sum_last(w * q * x)
    sumq2 = sum_last(w * q * q)
    d = xp.where(sumq2 > 0, sumqx / xp.where(sumq2 > 0, sumq2, scalar(x, 1.0)), scalar(x, 0.0))
    return d, sumqx, sumq2


def block_scales(x, w):
    """Per 32-block float scale (ggml's search over 15 inverse scales around −max/127); numpy or
    torch, the same on either."""
    xp = array_namespace(x, w)
    c = lambda v: scalar(x, v)  # noqa: E731
    amax_i = xp.argmax(xp.abs(x), axis=-1)
    mx = xp.take_along_axis(x, amax_i[:, None], axis=-1)[:, 0]
    ok = xp.abs(mx) >= c(_EPS)
    safe = xp.where(ok, mx, c(1.0))
    d, sumqx, _ = _fit(x, w, c(-KVALUES[0]) / safe)  # first guess: the largest |x| onto −127
    best = d * sumqx
    for itry in range(-_NTRY, _NTRY + 1):
        dt, sqx, sq2 = _fit(x, w, c(itry + KVALUES[0]) / safe)
        better = (sq2 > 0) & (sqx * sqx > best * sq2)
        d = xp.where(better, dt, d)
        best = xp.where(better, dt * sqx, best)
    return xp.where(ok, d, c(0.0))


def _pack(idx):
    """(N, 32) indices → (N, 16) bytes: element j low nibble, element j+16 high nibble."""
    return u8(idx[:, :16] | (idx[:, 16:] << 4))


def _inverse(v):
    """1/v, and 0 where v is 0 (an all-zero block decodes to zeros whatever its indices)."""
    xp = array_namespace(v)
    nz = v != 0
    one = xp.asarray(1.0, dtype=v.dtype, device=device_of(v))
    return xp.where(nz, one / xp.where(nz, v, one), one * 0)


# x: (blocks, size) float32 numpy; device: where the encoding runs (torch; None: numpy), same bytes.

def _encode_nl(x: np.ndarray, imp: np.ndarray | None, device=None) -> np.ndarray:
    xd = on_device(x.reshape(-1, _BLOCK), device)
    xp = array_namespace(xd)
    d = fp16_round(block_scales(xd, _weights(xd, on_device(imp, device), _BLOCK)))
    idx = nearest_index(xd * _inverse(d)[:, None])
    return to_host(xp.concat([fp16_bytes(d), _pack(idx)], axis=1))


def _encode_xs(x: np.ndarray, imp: np.ndarray | None, device=None) -> np.ndarray:
    n = x.shape[0]
    xd = on_device(x, device)
    xp = array_namespace(xd)
    xb = xd.reshape(-1, _BLOCK)
    w = _weights(xd, on_device(imp, device), QK_K).reshape(-1, _BLOCK)
    sc = block_scales(xb, w).reshape(n, QK_K // _BLOCK)
    mx = xp.take_along_axis(sc, xp.argmax(xp.abs(sc), axis=-1)[:, None], axis=-1)[:, 0]
    df = fp16_round(-mx / scalar(mx, 32))
    ls = xp.astype(xp.clip(xp.round(_inverse(df)[:, None] * sc), -32.0, 31.0), xp.int32)
    dl = (xp.astype(df, xp.float64)[:, None] * xp.astype(ls, xp.float64)).reshape(-1)  # float64, as numpy promotes
    idx = nearest_index(xb * _inverse(dl)[:, None])
    u = ls + 32  # (n, 8) 6-bit block scales
    scales_l = u8((u[:, 0::2] & 0xF) | ((u[:, 1::2] & 0xF) << 4))
    h = u[:, 0] >> 4
    for j in range(1, 8):
        h = h | ((u[:, j] >> 4) << (2 * j))  # the high bits of all 8 scales: one little-endian uint16
    return to_host(xp.concat([fp16_bytes(df), u8(h & 0xFF)[:, None], u8(h >> 8)[:, None], scales_l,
                              _pack(idx).reshape(n, -1)], axis=1))


def encode_iq4(name: str, weight: np.ndarray, importance: np.ndarray | None = None, device=None) -> np.ndarray:
    """(rows, cols) float32 → (rows, bytes per row) uint8 in ggml's IQ4_NL / IQ4_XS layout;
    `device`: where the scale searches run (a torch device; None: numpy), the same bytes."""
    rows, cols = weight.shape
    size = QK_K if name == "IQ4_XS" else _BLOCK
    x = np.ascontiguousarray(weight, np.float32).reshape(-1, size)
    imp = None
    if importance is not None:
        imp = np.broadcast_to(np.asarray(importance, np.float32).reshape(1, cols // size, size),
                              (rows, cols // size, size)).reshape(-1, size)
    enc = _encode_xs if name == "IQ4_XS" else _encode_nl
    step = _CHUNK * (QK_K // size) * (1 if device is None else 16)
    parts = [enc(x[i : i + step], None if imp is None else imp[i : i + step], device) for i in range(0, len(x), step)]
    return np.concatenate(parts).reshape(rows, -1)


# ---------------------------------------------------------------- affine views, code writers, registration

def _affine_nl(b):
    d = f16_at(b, 0)
    return AffineBlocks(nibbles(b[..., 2:18]), d, np.zeros_like(d), 4, True, values=KVALUES)


def _affine_xs(b):
    rows, n = b.shape[:2]
    h = b[..., 2:4].copy().view(np.uint16)[..., 0, None] >> (2 * np.arange(8, dtype=np.uint16))
    lo = np.stack([b[..., 4:8] & 0xF, b[..., 4:8] >> 4], axis=-1).reshape(rows, n, 8)
    ls = (lo | ((h & 3) << 4).astype(np.uint8)).astype(np.float32) - 32
    scale = (f16_at(b, 0)[..., None] * ls).reshape(rows, n * 8)
    q = nibbles(b[..., 8:136].reshape(rows, n, 8, 16)).reshape(rows, n * 8, 32)
    return AffineBlocks(q, scale, np.zeros_like(scale), 4, True, values=KVALUES)


def _codes_nl(b, q):
    b[..., 2:18] = pack_nibbles(q)


def _codes_xs(b, q):
    rows, n = b.shape[:2]
    b[..., 8:136] = pack_nibbles(q.reshape(rows, n, 8, 32)).reshape(rows, n, 128)


register("IQ4_NL", Codec(GGMLQuantizationType.IQ4_NL, lambda w, imp, device=None: encode_iq4("IQ4_NL", w, imp, device),
                         _affine_nl, _codes_nl, 15, KVALUES, llama_cpp_candidate=False, scale_fields=(0,)))
register("IQ4_XS", Codec(GGMLQuantizationType.IQ4_XS, lambda w, imp, device=None: encode_iq4("IQ4_XS", w, imp, device),
                         _affine_xs, _codes_xs, 15, KVALUES, scale_fields=(0,)))
