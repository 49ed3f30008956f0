"""llama.cpp k-quant encoders (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), vectorised over super-blocks.

Each encoder follows ggml's structure (ggml-quants.c): fit a scale (and min) per sub-block by a
weighted least-squares search, quantize the sub-block scales onto the super-block's 4/6/8-bit grid
under an fp16 super-scale, re-round every code against the scales actually stored, and pack the
bits in ggml's exact layout. The bytes are decoded by `gguf.quants.dequantize` (the reference).

Importance weights (per input column, e.g. diag(XᵀX) from calibration, as llama.cpp's imatrix)
turn the sub-block fits into calibration-weighted fits.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from haloquant.arrays import (array_namespace, device_of, fp16_bytes, fp16_round, int8_bytes, on_device, scalar,
                              sqrt32, sum_last, to_host, u8)
from haloquant.codec import CODECS, AffineBlocks, Codec, register

QK_K = 256
_CHUNK = 8192  # super-blocks per vectorised pass (bounds temporary memory)
_DEVICE_CHUNK = 1 << 16  # on a torch device: fewer, larger passes (~1 GB of temporaries)
_EPS = 1e-15


# ---------------------------------------------------------------- sub-block fits

def fit_scale_min(x, w, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Weighted fit of x ≈ scale·q − m, q ∈ [0, nmax], m ≥ 0 (ggml make_qkx2_quants, vectorised).
    x, w: (S, n) numpy arrays or torch tensors (haloquant.arrays: the same bytes on either).
    Returns scale (S,), m (S,) float32 of x's kind."""
    xp = array_namespace(x, w)
    c = lambda v: scalar(x, v)  # noqa: E731
    mn = xp.clip(xp.min(x, axis=-1), max=0.0)
    rng = xp.max(x, axis=-1) - mn
    flat = rng <= 0
    rng = xp.where(flat, c(1.0), rng)
    sum_w, sum_x = sum_last(w), sum_last(w * x)
    xs = x - mn[:, None]
    scale = rng / c(nmax)
    q = xp.clip(xp.round(xs / scale[:, None]), 0.0, float(nmax))
    best = sum_last(w * (scale[:, None] * q + mn[:, None] - x) ** 2)
    best_scale, best_min = scale, mn
    for i in range(nstep + 1):
        q = xp.clip(xp.round(xs * (c(rmin + rdelta * i + nmax) / rng)[:, None]), 0.0, float(nmax))
        sl, sl2, sxl = sum_last(w * q), sum_last(w * q * q), sum_last(w * q * x)
        det = sum_w * sl2 - sl * sl
        ok = det > 0
        det = xp.where(ok, det, c(1.0))
        s = (sum_w * sxl - sum_x * sl) / det
        m = (sl2 * sum_x - sl * sxl) / det
        pos = m > 0  # the min may not be positive: refit the scale alone
        s = xp.where(pos, sxl / xp.where(sl2 > 0, sl2, c(1.0)), s)
        m = xp.where(pos, c(0.0), m)
        err = sum_last(w * (s[:, None] * q + m[:, None] - x) ** 2)
        better = ok & (err < best)
        best = xp.where(better, err, best)
        best_scale = xp.where(better, s, best_scale)
        best_min = xp.where(better, m, best_min)
    best_scale = xp.where(flat, c(0.0), best_scale)
    best_min = xp.where(flat, mn, best_min)
    return best_scale, -best_min


def fit_scale_symmetric(x, w, nmax: int, nstep: int = 9):
    """Weighted fit of x ≈ scale·q, q ∈ [−nmax, nmax−1] (ggml make_qx_quants, vectorised; numpy or
    torch as fit_scale_min). The largest-magnitude value maps to −nmax, so the scale carries its sign."""
    xp = array_namespace(x, w)
    c = lambda v: scalar(x, v)  # noqa: E731
    idx = xp.argmax(xp.abs(x), axis=-1)
    mx = xp.take_along_axis(x, idx[:, None], axis=-1)[:, 0]
    zero = xp.abs(mx) < c(1e-30)
    mx = xp.where(zero, c(1.0), mx)
    best_obj = xp.full(mx.shape, -xp.inf, dtype=xp.float32, device=device_of(x))
    best = xp.zeros(mx.shape, dtype=xp.float32, device=device_of(x))
    for i in range(-nstep, nstep + 1):
        q = xp.clip(xp.round(x * (c(-(nmax + 0.1 * i)) / mx)[:, None]), -float(nmax), float(nmax - 1))
        slx, sl2 = sum_last(w * x * q), sum_last(w * q * q)
        ok = sl2 > 0
        sl2 = xp.where(ok, sl2, c(1.0))
        obj = xp.where(ok, slx * slx / sl2, c(-np.inf))
        better = obj > best_obj
        best_obj = xp.where(better, obj, best_obj)
        best = xp.where(better, slx / sl2, best)
    return xp.where(zero, c(0.0), best)


def _weights(x, importance, default: str):
    """Per-element weights for the sub-block fits, shape of x (B, 256); numpy or torch."""
    xp = array_namespace(x)
    if importance is not None:  # llama.cpp's imatrix weighting: qw·sqrt(σ² + x²)
        sigma2 = sum_last(x * x)[:, None] / scalar(x, x.shape[-1])
        return importance * sqrt32(sigma2 + x * x)
    if default == "abs":
        return xp.abs(x)
    if default == "sq":
        return x * x
    raise ValueError(default)


# ---------------------------------------------------------------- bit packing (numpy or torch)

def _pack_2bit(q):
    """(B, 256) codes < 4 → (B, 64): byte l of each 128-half holds elements l, l+32, l+64, l+96."""
    r = u8(q.reshape(-1, 2, 4, 32))
    return (r[:, :, 0] | (r[:, :, 1] << 2) | (r[:, :, 2] << 4) | (r[:, :, 3] << 6)).reshape(-1, 64)


def _unpack_2bit(b: np.ndarray) -> np.ndarray:
    r = b.reshape(-1, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    return (r & 3).reshape(-1, 256)


def _pack_nibbles64(q):
    """(B, 256) → (B, 128): for each 64-chunk, byte l = element l | element l+32 << 4."""
    r = u8(q.reshape(-1, 4, 2, 32))
    return (r[:, :, 0] | (r[:, :, 1] << 4)).reshape(-1, 128)


def _unpack_nibbles64(b: np.ndarray) -> np.ndarray:
    r = b.reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (r & 0xF).reshape(-1, 256)


def _or_bits(planes):
    """(B, k, n) of 0/1 → (B, n) uint8 with plane j in bit j."""
    out = u8(planes[:, 0])
    for j in range(1, planes.shape[1]):
        out = out | (u8(planes[:, j]) << j)
    return out


def _pack_scales_k4(ls, lm):
    """8 six-bit scales and mins → 12 bytes (ggml's get_scale_min_k4 layout)."""
    xp = array_namespace(ls)
    ls, lm = u8(ls), u8(lm)
    return xp.concat([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                      (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], axis=1)


def _unpack_scales_k4(s: np.ndarray):
    ls = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    lm = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return ls, lm


def _pack_scales_q3(ls):
    """16 six-bit scales (already offset by 32) → 12 bytes (ggml's Q3_K layout)."""
    xp = array_namespace(ls)
    ls = u8(ls)
    hi = (ls >> 4).reshape(-1, 4, 4)  # [j//4, j%4]
    return xp.concat([(ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4),
                      hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)], axis=1)


def _unpack_scales_q3(s: np.ndarray) -> np.ndarray:
    low = np.concatenate([s[:, 0:8] & 0xF, s[:, 0:8] >> 4], axis=1)
    hi = (s[:, 8:12].reshape(-1, 1, 4) >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 4, 1)) & 3
    return (low | (hi.reshape(-1, 16) << 4)).astype(np.int16) - 32


# ---------------------------------------------------------------- super-block scale grids

def _quantize_unsigned(values, levels: int):
    """Per-row grid for non-negative sub-block scales: fp16 super-scale d, integer l ≤ levels."""
    xp = array_namespace(values)
    c = lambda v: scalar(values, v)  # noqa: E731
    mx = xp.max(values, axis=-1)
    inv = xp.where(mx > 0, c(levels) / xp.where(mx > 0, mx, c(1.0)), c(0.0))
    l = u8(xp.clip(xp.round(inv[:, None] * values), max=float(levels)))
    return fp16_round(mx / c(levels)), l


def _requantize_affine(x, d, ls, dmin, lm, group: int, nmax: int):
    """Codes against the stored scales: q = round((x + dmin·lm) / (d·ls)), groups with d·ls = 0 → 0."""
    xp = array_namespace(x)
    scale = d[:, None] * xp.astype(ls, xp.float32)
    mins = dmin[:, None] * xp.astype(lm, xp.float32)
    xg = x.reshape(x.shape[0], -1, group)
    ok = scale != 0
    q = xp.round((xg + mins[..., None]) / xp.where(ok, scale, scalar(x, 1.0))[..., None])
    return u8(xp.where(ok[..., None], xp.clip(q, 0.0, float(nmax)), scalar(x, 0.0)).reshape(x.shape[0], -1))


def _requantize_symmetric(x, d, ls, group: int, nmax: int):
    xp = array_namespace(x)
    scale = d[:, None] * ls
    xg = x.reshape(x.shape[0], -1, group)
    ok = scale != 0
    q = xp.round(xg / xp.where(ok, scale, scalar(x, 1.0))[..., None])
    q = xp.where(ok[..., None], xp.clip(q, -float(nmax), float(nmax - 1)), scalar(x, 0.0)) + scalar(x, nmax)
    return u8(q.reshape(x.shape[0], -1))


def _signed_max(sc):
    """Per row, the entry of largest magnitude (first on ties), sign kept."""
    xp = array_namespace(sc)
    return xp.take_along_axis(sc, xp.argmax(xp.abs(sc), axis=-1)[:, None], axis=-1)[:, 0]


# ---------------------------------------------------------------- encoders
# x: (B, 256) float32 numpy; imp: the same or None; device: where the whole encoding runs (a torch
# device, None: numpy) — the bytes come back as numpy and are the same either way.

def _encode_q2_k(x, imp, device):
    xd = on_device(x, device)
    xp = array_namespace(xd)
    w = _weights(xd, on_device(imp, device), "abs")
    sc, mn = fit_scale_min(xd.reshape(-1, 16), w.reshape(-1, 16), 3, -0.5, 0.1, 15)
    d, ls = _quantize_unsigned(sc.reshape(-1, 16), 15)
    dmin, lm = _quantize_unsigned(mn.reshape(-1, 16), 15)
    q = _requantize_affine(xd, d, ls, dmin, lm, 16, 3)
    return to_host(xp.concat([ls | (lm << 4), _pack_2bit(q), fp16_bytes(d), fp16_bytes(dmin)], axis=1))


def _encode_q3_k(x, imp, device):
    xd = on_device(x, device)
    xp = array_namespace(xd)
    c = lambda v: scalar(xd, v)  # noqa: E731
    w = _weights(xd, on_device(imp, device), "sq")
    sc = fit_scale_symmetric(xd.reshape(-1, 16), w.reshape(-1, 16), 4).reshape(-1, 16)
    mx = _signed_max(sc)
    nz = mx != 0
    iscale = xp.where(nz, c(-32.0) / xp.where(nz, mx, c(1.0)), c(0.0))
    ls = xp.clip(xp.round(iscale[:, None] * sc), -32.0, 31.0)
    d = fp16_round(xp.where(nz, c(1.0) / xp.where(nz, iscale, c(1.0)), c(0.0)))
    q = _requantize_symmetric(xd, d, ls, 16, 4)
    hmask = _or_bits((q > 3).reshape(-1, 8, 32))
    return to_host(xp.concat([hmask, _pack_2bit(q & 3), _pack_scales_q3(ls + c(32.0)), fp16_bytes(d)], axis=1))


def _encode_q45_k(x, imp, device, bits: int):
    nmax = (1 << bits) - 1
    xd = on_device(x, device)
    xp = array_namespace(xd)
    if imp is None:  # ggml's reference weighting: rms of the sub-block + |x|
        xs = xd.reshape(-1, 32)
        w = (sqrt32(sum_last(xs * xs)[:, None] / scalar(xs, 32)) + xp.abs(xs)).reshape(x.shape)
    else:
        w = _weights(xd, on_device(imp, device), "abs")
    rmin, nstep = (-1.0, 20) if bits == 4 else (-0.5, 15)
    sc, mn = fit_scale_min(xd.reshape(-1, 32), w.reshape(-1, 32), nmax, rmin, 0.1, nstep)
    d, ls = _quantize_unsigned(sc.reshape(-1, 8), 63)
    dmin, lm = _quantize_unsigned(mn.reshape(-1, 8), 63)
    q = _requantize_affine(xd, d, ls, dmin, lm, 32, nmax)
    head = [fp16_bytes(d), fp16_bytes(dmin), _pack_scales_k4(ls, lm)]
    if bits == 4:
        return to_host(xp.concat(head + [_pack_nibbles64(q)], axis=1))
    hi = (q >> 4).reshape(-1, 4, 2, 32)
    qh = _or_bits(hi.reshape(-1, 8, 32))  # plane 2c+h: bit 4 of the codes of chunk c, half h
    return to_host(xp.concat(head + [qh, _pack_nibbles64(q & 0xF)], axis=1))


def _encode_q6_k(x, imp, device):
    xd = on_device(x, device)
    xp = array_namespace(xd)
    c = lambda v: scalar(xd, v)  # noqa: E731
    w = _weights(xd, on_device(imp, device), "sq")
    sc = fit_scale_symmetric(xd.reshape(-1, 16), w.reshape(-1, 16), 32).reshape(-1, 16)
    mx = _signed_max(sc)
    nz = xp.abs(mx) >= c(_EPS)
    iscale = xp.where(nz, c(-128.0) / xp.where(nz, mx, c(1.0)), c(0.0))
    ls = xp.clip(xp.round(iscale[:, None] * sc), max=127.0)
    d = fp16_round(xp.where(nz, c(1.0) / xp.where(nz, iscale, c(1.0)), c(0.0)))
    q = _requantize_symmetric(xd, d, ls, 16, 32)
    r = q.reshape(-1, 2, 4, 32)
    ql = xp.concat([(r[:, :, 0] & 0xF) | ((r[:, :, 2] & 0xF) << 4),
                    (r[:, :, 1] & 0xF) | ((r[:, :, 3] & 0xF) << 4)], axis=2).reshape(-1, 128)
    qh = ((r[:, :, 0] >> 4) | ((r[:, :, 1] >> 4) << 2) | ((r[:, :, 2] >> 4) << 4) | ((r[:, :, 3] >> 4) << 6))
    return to_host(xp.concat([ql, qh.reshape(-1, 64), int8_bytes(ls), fp16_bytes(d)], axis=1))


def _encoder(enc):
    """A super-block encoder → (rows, cols) float32 → (rows, cols/256 · type_size) uint8 in ggml's
    block layout. `device` (a torch device): the scale searches run there, in torch — the same bytes
    as numpy's (haloquant.arrays); None: numpy."""

    def encode(weight: np.ndarray, importance: np.ndarray | None = None, device=None) -> np.ndarray:
        rows, cols = weight.shape
        x = np.ascontiguousarray(weight, np.float32).reshape(-1, QK_K)
        imp = None
        if importance is not None:
            imp = np.broadcast_to(np.asarray(importance, np.float32).reshape(1, cols // QK_K, QK_K),
                                  (rows, cols // QK_K, QK_K)).reshape(-1, QK_K)
        step = _CHUNK if device is None else _DEVICE_CHUNK
        parts = [enc(x[i : i + step], None if imp is None else imp[i : i + step], device)
                 for i in range(0, len(x), step)]
        return np.concatenate(parts).reshape(rows, -1)
    return encode


# ---------------------------------------------------------------- affine views (bytes → codes, scales)
# b: (B, type_size) super-blocks → (q (B, groups, group), scale, zero, constant | None), with
# value = (q − zero)·scale exactly as ggml decodes it.

def _f16(b, off):
    return b[:, off : off + 2].copy().view(np.float16)[:, 0].astype(np.float32)


def with_min(q, scale, mins, group):
    """d·q − m per group → codes (…, groups, group), scale, zero, constant mask; a zero scale leaves
    only −m: codes 0, scale 1, zero m (the legacy types' d·q + m too, with mins = −m)."""
    ok = scale != 0
    q = np.where(ok[..., None], q.reshape(q.shape[0], -1, group), 0)
    zero = np.where(ok, mins / np.where(ok, scale, 1), mins)
    return q, np.where(ok, scale, 1), zero, ~ok


def _view_q2_k(b):
    s = b[:, 0:16]
    return with_min(_unpack_2bit(b[:, 16:80]), _f16(b, 80)[:, None] * (s & 0xF), _f16(b, 82)[:, None] * (s >> 4), 16)


def _view_q3_k(b):
    hbit = (b[:, 0:32].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    q = (_unpack_2bit(b[:, 32:96]) | (hbit.reshape(-1, 256) << 2)).reshape(-1, 16, 16)
    scale = _f16(b, 108)[:, None] * _unpack_scales_q3(b[:, 96:108])
    return q, scale, np.full(scale.shape, 4.0, np.float32), None


def _view_q45_k(b, bits: int):
    ls, lm = _unpack_scales_k4(b[:, 4:16])
    if bits == 4:
        q = _unpack_nibbles64(b[:, 16:144])
    else:
        hi = (b[:, 16:48].reshape(-1, 1, 1, 32) >> (np.arange(8, dtype=np.uint8).reshape(1, 4, 2, 1))) & 1
        q = _unpack_nibbles64(b[:, 48:176]) | (hi.reshape(-1, 256) << 4)
    return with_min(q, _f16(b, 0)[:, None] * ls, _f16(b, 2)[:, None] * lm, 32)


def _view_q6_k(b):
    ql, qh = b[:, 0:128].reshape(-1, 2, 64), b[:, 128:192].reshape(-1, 2, 32)
    low = np.stack([ql[:, :, :32] & 0xF, ql[:, :, 32:] & 0xF, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4], axis=2)
    high = np.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=2)
    q = (low | (high << 4)).reshape(-1, 16, 16)
    scale = _f16(b, 208)[:, None] * b[:, 192:208].view(np.int8).astype(np.float32)
    return q, scale, np.full(scale.shape, 32.0, np.float32), None


def _affine(view, bits: int, zero_is_integer: bool):
    """A super-block view → (rows, n_superblocks, type_size) blocks → AffineBlocks (codes as uint8;
    5- and 6-bit codes are viewed as 8-bit ones, as onnxruntime's MatMulNBits takes 2, 4 or 8 bits)."""

    def parse(blocks: np.ndarray) -> AffineBlocks:
        rows, nsb, _ = blocks.shape
        q, scale, zero, constant = view(blocks.reshape(-1, blocks.shape[-1]))
        groups = q.shape[1] * nsb
        return AffineBlocks(q.reshape(rows, groups, -1).astype(np.uint8), scale.reshape(rows, groups).astype(np.float32),
                            zero.reshape(rows, groups).astype(np.float32), bits, zero_is_integer,
                            None if constant is None else constant.reshape(rows, groups))
    return parse


# ---------------------------------------------------------------- code writers (codes → bytes, scales kept)
# b: (B, type_size) super-blocks, written in place; q: (B, 256) uint8 codes.

def _codes_q2_k(b, q):
    b[:, 16:80] = _pack_2bit(q)


def _codes_q3_k(b, q):
    hmask = ((q >> 2) & 1).reshape(-1, 8, 32)
    b[:, 0:32] = np.bitwise_or.reduce(hmask << np.arange(8, dtype=np.uint8).reshape(1, 8, 1), axis=1)
    b[:, 32:96] = _pack_2bit(q & 3)


def _codes_q4_k(b, q):
    b[:, 16:144] = _pack_nibbles64(q)


def _codes_q5_k(b, q):
    hi = (q >> 4).reshape(-1, 4, 2, 32)
    qh = np.zeros((b.shape[0], 32), np.uint8)
    for c in range(4):
        for h in range(2):
            qh |= hi[:, c, h] << np.uint8(2 * c + h)
    b[:, 16:48] = qh
    b[:, 48:176] = _pack_nibbles64(q & 0xF)


def _codes_q6_k(b, q):
    r = q.reshape(-1, 2, 4, 32)
    b[:, 0:128] = np.concatenate([(r[:, :, 0] & 0xF) | ((r[:, :, 2] & 0xF) << 4),
                                  (r[:, :, 1] & 0xF) | ((r[:, :, 3] & 0xF) << 4)], axis=2).reshape(-1, 128)
    b[:, 128:192] = ((r[:, :, 0] >> 4) | ((r[:, :, 1] >> 4) << 2) | ((r[:, :, 2] >> 4) << 4)
                     | ((r[:, :, 3] >> 4) << 6)).reshape(-1, 64)


def _code_writer(put):
    """(rows, n_superblocks, type_size) blocks and q (rows, groups, group size) → the code bits
    overwritten in place, scales, mins and super-scales as they are."""

    def write(blocks: np.ndarray, q: np.ndarray) -> None:
        b = blocks.reshape(-1, blocks.shape[-1])
        put(b, q.reshape(b.shape[0], QK_K).astype(np.uint8))
    return write


_T = GGMLQuantizationType
for _name, _type, _enc, _view, _bits, _integer, _codes, _max, _scales in (
        ("Q2_K", _T.Q2_K, _encode_q2_k, _view_q2_k, 2, False, _codes_q2_k, 3, (80, 82)),
        ("Q3_K", _T.Q3_K, _encode_q3_k, _view_q3_k, 4, True, _codes_q3_k, 7, (108,)),
        ("Q4_K", _T.Q4_K, lambda x, i, d: _encode_q45_k(x, i, d, 4), lambda b: _view_q45_k(b, 4), 4, False,
         _codes_q4_k, 15, (0, 2)),
        ("Q5_K", _T.Q5_K, lambda x, i, d: _encode_q45_k(x, i, d, 5), lambda b: _view_q45_k(b, 5), 8, False,
         _codes_q5_k, 31, (0, 2)),
        ("Q6_K", _T.Q6_K, _encode_q6_k, _view_q6_k, 8, True, _codes_q6_k, 63, (208,))):
    register(_name, Codec(_type, _encoder(_enc), _affine(_view, _bits, _integer), _code_writer(_codes), _max,
                          scale_fields=_scales))


def encode_kquant(name: str, weight: np.ndarray, importance: np.ndarray | None = None, device=None) -> np.ndarray:
    """(rows, cols) float32 → ggml's block bytes of k-quant `name` (haloquant's own fit alone)."""
    return CODECS[name].encode(weight, importance, device)
