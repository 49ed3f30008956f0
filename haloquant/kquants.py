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

QK_K = 256
_CHUNK = 8192  # super-blocks per vectorised pass (bounds temporary memory)
_EPS = 1e-15


def _rint(x: np.ndarray) -> np.ndarray:
    return np.rint(x)  # round half to even, as ggml's nearest_int


def _fp16_round(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(-1, 2)


# ---------------------------------------------------------------- sub-block fits

def fit_scale_min(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Weighted fit of x ≈ scale·q − m, q ∈ [0, nmax], m ≥ 0 (ggml make_qkx2_quants, vectorised).
    x, w: (S, n). Returns scale (S,), m (S,)."""
    mn = np.minimum(x.min(-1), 0)
    rng = x.max(-1) - mn
    flat = rng <= 0
    rng = np.where(flat, 1, rng)
    sum_w, sum_x = w.sum(-1), (w * x).sum(-1)
    xs = x - mn[:, None]
    scale = rng / nmax
    q = np.clip(_rint(xs / scale[:, None]), 0, nmax)
    best = (w * (scale[:, None] * q + mn[:, None] - x) ** 2).sum(-1)
    best_scale, best_min = scale, mn
    for i in range(nstep + 1):
        q = np.clip(_rint(xs * ((rmin + rdelta * i + nmax) / rng)[:, None]), 0, nmax)
        sl, sl2, sxl = (w * q).sum(-1), (w * q * q).sum(-1), (w * q * x).sum(-1)
        det = sum_w * sl2 - sl * sl
        ok = det > 0
        det = np.where(ok, det, 1)
        s = (sum_w * sxl - sum_x * sl) / det
        m = (sl2 * sum_x - sl * sxl) / det
        pos = m > 0  # the min may not be positive: refit the scale alone
        s = np.where(pos, sxl / np.where(sl2 > 0, sl2, 1), s)
        m = np.where(pos, 0, m)
        err = (w * (s[:, None] * q + m[:, None] - x) ** 2).sum(-1)
        better = ok & (err < best)
        best = np.where(better, err, best)
        best_scale = np.where(better, s, best_scale)
        best_min = np.where(better, m, best_min)
    best_scale = np.where(flat, 0, best_scale)
    best_min = np.where(flat, mn, best_min)
    return best_scale.astype(np.float32), (-best_min).astype(np.float32)


def fit_scale_symmetric(x: np.ndarray, w: np.ndarray, nmax: int, nstep: int = 9) -> np.ndarray:
    """Weighted fit of x ≈ scale·q, q ∈ [−nmax, nmax−1] (ggml make_qx_quants, vectorised).
    The largest-magnitude value maps to −nmax, so the scale carries its sign."""
    idx = np.abs(x).argmax(-1)
    mx = np.take_along_axis(x, idx[:, None], -1)[:, 0]
    zero = np.abs(mx) < 1e-30
    mx = np.where(zero, 1, mx)
    best_obj = np.full(x.shape[0], -np.inf)
    best = np.zeros(x.shape[0])
    for i in range(-nstep, nstep + 1):
        q = np.clip(_rint(x * (-(nmax + 0.1 * i) / mx)[:, None]), -nmax, nmax - 1)
        slx, sl2 = (w * x * q).sum(-1), (w * q * q).sum(-1)
        ok = sl2 > 0
        sl2 = np.where(ok, sl2, 1)
        obj = np.where(ok, slx * slx / sl2, -np.inf)
        better = obj > best_obj
        best_obj = np.where(better, obj, best_obj)
        best = np.where(better, slx / sl2, best)
    return np.where(zero, 0, best).astype(np.float32)


def _weights(x: np.ndarray, importance: np.ndarray | None, default: str) -> np.ndarray:
    """Per-element weights for the sub-block fits, shape of x (B, 256)."""
    if importance is not None:  # llama.cpp's imatrix weighting: qw·sqrt(σ² + x²)
        sigma2 = (x * x).mean(-1, keepdims=True)
        return importance * np.sqrt(sigma2 + x * x)
    if default == "abs":
        return np.abs(x)
    if default == "sq":
        return x * x
    raise ValueError(default)


# ---------------------------------------------------------------- bit packing

def _pack_2bit(q: np.ndarray) -> np.ndarray:
    """(B, 256) codes < 4 → (B, 64): byte l of each 128-half holds elements l, l+32, l+64, l+96."""
    r = q.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (r[:, :, 0] | (r[:, :, 1] << 2) | (r[:, :, 2] << 4) | (r[:, :, 3] << 6)).reshape(-1, 64)


def _unpack_2bit(b: np.ndarray) -> np.ndarray:
    r = b.reshape(-1, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    return (r & 3).reshape(-1, 256)


def _pack_nibbles64(q: np.ndarray) -> np.ndarray:
    """(B, 256) → (B, 128): for each 64-chunk, byte l = element l | element l+32 << 4."""
    r = q.reshape(-1, 4, 2, 32).astype(np.uint8)
    return (r[:, :, 0] | (r[:, :, 1] << 4)).reshape(-1, 128)


def _unpack_nibbles64(b: np.ndarray) -> np.ndarray:
    r = b.reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (r & 0xF).reshape(-1, 256)


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins → 12 bytes (ggml's get_scale_min_k4 layout)."""
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    out = np.empty((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out


def _unpack_scales_k4(s: np.ndarray):
    ls = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    lm = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return ls, lm


def _pack_scales_q3(ls: np.ndarray) -> np.ndarray:
    """16 six-bit scales (already offset by 32) → 12 bytes (ggml's Q3_K layout)."""
    ls = ls.astype(np.uint8)
    out = np.empty((ls.shape[0], 12), np.uint8)
    out[:, 0:8] = (ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4)
    hi = (ls >> 4).reshape(-1, 4, 4)  # [j//4, j%4]
    out[:, 8:12] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    return out


def _unpack_scales_q3(s: np.ndarray) -> np.ndarray:
    low = np.concatenate([s[:, 0:8] & 0xF, s[:, 0:8] >> 4], axis=1)
    hi = (s[:, 8:12].reshape(-1, 1, 4) >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 4, 1)) & 3
    return (low | (hi.reshape(-1, 16) << 4)).astype(np.int16) - 32


# ---------------------------------------------------------------- super-block scale grids

def _quantize_unsigned(values: np.ndarray, levels: int):
    """Per-row grid for non-negative sub-block scales: fp16 super-scale d, integer l ≤ levels."""
    mx = values.max(-1)
    inv = np.where(mx > 0, levels / np.where(mx > 0, mx, 1), 0)
    l = np.minimum(levels, _rint(inv[:, None] * values)).astype(np.uint8)
    return _fp16_round(mx / levels), l


def _requantize_affine(x, d, ls, dmin, lm, group: int, nmax: int) -> np.ndarray:
    """Codes against the stored scales: q = round((x + dmin·lm) / (d·ls)), groups with d·ls = 0 → 0."""
    scale = (d[:, None] * ls).astype(np.float32)
    mins = (dmin[:, None] * lm).astype(np.float32)
    xg = x.reshape(x.shape[0], -1, group)
    ok = scale != 0
    q = _rint((xg + mins[..., None]) / np.where(ok, scale, 1)[..., None])
    return np.where(ok[..., None], np.clip(q, 0, nmax), 0).reshape(x.shape[0], -1).astype(np.uint8)


def _requantize_symmetric(x, d, ls, group: int, nmax: int) -> np.ndarray:
    scale = (d[:, None] * ls).astype(np.float32)
    xg = x.reshape(x.shape[0], -1, group)
    ok = scale != 0
    q = _rint(xg / np.where(ok, scale, 1)[..., None])
    return (np.where(ok[..., None], np.clip(q, -nmax, nmax - 1), 0) + nmax).reshape(x.shape[0], -1).astype(np.uint8)


# ---------------------------------------------------------------- encoders (x: (B, 256) float32)

def _encode_q2_k(x, imp):
    w = _weights(x, imp, "abs")
    sc, mn = fit_scale_min(x.reshape(-1, 16), w.reshape(-1, 16), 3, -0.5, 0.1, 15)
    sc, mn = sc.reshape(-1, 16), mn.reshape(-1, 16)
    d, ls = _quantize_unsigned(sc, 15)
    dmin, lm = _quantize_unsigned(mn, 15)
    q = _requantize_affine(x, d, ls, dmin, lm, 16, 3)
    return np.concatenate([ls | (lm << 4), _pack_2bit(q), _fp16_bytes(d), _fp16_bytes(dmin)], axis=1)


def _encode_q3_k(x, imp):
    w = _weights(x, imp, "sq")
    sc = fit_scale_symmetric(x.reshape(-1, 16), w.reshape(-1, 16), 4).reshape(-1, 16)
    idx = np.abs(sc).argmax(-1)
    mx = np.take_along_axis(sc, idx[:, None], -1)[:, 0]
    nz = mx != 0
    iscale = np.where(nz, -32 / np.where(nz, mx, 1), 0)
    ls = np.clip(_rint(iscale[:, None] * sc), -32, 31)
    d = _fp16_round(np.where(nz, 1 / np.where(nz, iscale, 1), 0))
    q = _requantize_symmetric(x, d, ls, 16, 4)
    hmask = (q > 3).reshape(-1, 8, 32).astype(np.uint8)
    hmask = np.bitwise_or.reduce(hmask << np.arange(8, dtype=np.uint8).reshape(1, 8, 1), axis=1)
    return np.concatenate([hmask, _pack_2bit(q & 3), _pack_scales_q3(ls + 32), _fp16_bytes(d)], axis=1)


def _encode_q45_k(x, imp, bits: int):
    nmax = (1 << bits) - 1
    if imp is None:  # ggml's reference weighting: rms of the sub-block + |x|
        xs = x.reshape(-1, 32)
        w = (np.sqrt((xs * xs).mean(-1, keepdims=True)) + np.abs(xs)).reshape(x.shape)
    else:
        w = _weights(x, imp, "abs")
    rmin, nstep = (-1.0, 20) if bits == 4 else (-0.5, 15)
    sc, mn = fit_scale_min(x.reshape(-1, 32), w.reshape(-1, 32), nmax, rmin, 0.1, nstep)
    d, ls = _quantize_unsigned(sc.reshape(-1, 8), 63)
    dmin, lm = _quantize_unsigned(mn.reshape(-1, 8), 63)
    q = _requantize_affine(x, d, ls, dmin, lm, 32, nmax)
    head = [_fp16_bytes(d), _fp16_bytes(dmin), _pack_scales_k4(ls, lm)]
    if bits == 4:
        return np.concatenate(head + [_pack_nibbles64(q)], axis=1)
    hi = (q >> 4).reshape(-1, 4, 2, 32)
    qh = np.zeros((q.shape[0], 32), np.uint8)
    for c in range(4):
        for h in range(2):
            qh |= hi[:, c, h] << np.uint8(2 * c + h)
    return np.concatenate(head + [qh, _pack_nibbles64(q & 0xF)], axis=1)


def _encode_q6_k(x, imp):
    w = _weights(x, imp, "sq")
    sc = fit_scale_symmetric(x.reshape(-1, 16), w.reshape(-1, 16), 32).reshape(-1, 16)
    idx = np.abs(sc).argmax(-1)
    mx = np.take_along_axis(sc, idx[:, None], -1)[:, 0]
    nz = np.abs(mx) >= _EPS
    iscale = np.where(nz, -128 / np.where(nz, mx, 1), 0)
    ls = np.minimum(127, _rint(iscale[:, None] * sc))
    d = _fp16_round(np.where(nz, 1 / np.where(nz, iscale, 1), 0))
    q = _requantize_symmetric(x, d, ls, 16, 32)
    r = q.reshape(-1, 2, 4, 32)
    ql = np.concatenate([(r[:, :, 0] & 0xF) | ((r[:, :, 2] & 0xF) << 4),
                         (r[:, :, 1] & 0xF) | ((r[:, :, 3] & 0xF) << 4)], axis=2).reshape(-1, 128)
    qh = ((r[:, :, 0] >> 4) | ((r[:, :, 1] >> 4) << 2) | ((r[:, :, 2] >> 4) << 4) | ((r[:, :, 3] >> 4) << 6))
    return np.concatenate([ql, qh.reshape(-1, 64), ls.astype(np.int8).view(np.uint8), _fp16_bytes(d)], axis=1)


_ENCODERS = {"Q2_K": _encode_q2_k, "Q3_K": _encode_q3_k, "Q4_K": lambda x, i: _encode_q45_k(x, i, 4),
             "Q5_K": lambda x, i: _encode_q45_k(x, i, 5), "Q6_K": _encode_q6_k}


def encode_kquant(name: str, weight: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """(rows, cols) float32 → (rows, cols/256 · type_size) uint8 in ggml's block layout."""
    rows, cols = weight.shape
    x = np.ascontiguousarray(weight, np.float32).reshape(-1, QK_K)
    imp = None
    if importance is not None:
        imp = np.broadcast_to(np.asarray(importance, np.float32).reshape(1, cols // QK_K, QK_K),
                              (rows, cols // QK_K, QK_K)).reshape(-1, QK_K)
    enc = _ENCODERS[name]
    parts = [enc(x[i : i + _CHUNK], None if imp is None else imp[i : i + _CHUNK]) for i in range(0, len(x), _CHUNK)]
    return np.concatenate(parts).reshape(rows, -1)


# ---------------------------------------------------------------- affine views (bytes → codes, scales)

def affine_kquant(name: str, blocks: np.ndarray):
    """(rows, n_superblocks, type_size) bytes → (q, scale, zero, bits, zero_is_integer) per group,
    with value = (q − zero)·scale exactly as ggml decodes it."""
    rows, nsb, _ = blocks.shape
    b = blocks.reshape(-1, blocks.shape[-1])

    def f16(off):
        return b[:, off : off + 2].copy().view(np.float16)[:, 0].astype(np.float32)

    constant = None

    def with_min(q, scale, mins, group):
        nonlocal constant
        ok = scale != 0  # a zero scale leaves only −min: encode it with codes 0, scale 1
        constant = ~ok
        q = np.where(ok[..., None], q.reshape(q.shape[0], -1, group), 0)
        zero = np.where(ok, mins / np.where(ok, scale, 1), mins)
        return q, np.where(ok, scale, 1), zero

    if name == "Q2_K":
        s = b[:, 0:16]
        q = _unpack_2bit(b[:, 16:80])
        q, scale, zero = with_min(q, f16(80)[:, None] * (s & 0xF), f16(82)[:, None] * (s >> 4), 16)
        bits, integer = 2, False
    elif name == "Q3_K":
        hm = b[:, 0:32]
        hbit = (hm.reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
        q = (_unpack_2bit(b[:, 32:96]) | (hbit.reshape(-1, 256) << 2)).reshape(-1, 16, 16)
        scale = f16(108)[:, None] * _unpack_scales_q3(b[:, 96:108])
        zero, bits, integer = np.full(scale.shape, 4.0, np.float32), 4, True
    elif name in ("Q4_K", "Q5_K"):
        ls, lm = _unpack_scales_k4(b[:, 4:16])
        if name == "Q4_K":
            q = _unpack_nibbles64(b[:, 16:144])
        else:
            qh = b[:, 16:48]
            hi = (qh.reshape(-1, 1, 1, 32) >> (np.arange(8, dtype=np.uint8).reshape(1, 4, 2, 1))) & 1
            q = _unpack_nibbles64(b[:, 48:176]) | (hi.reshape(-1, 256) << 4)
        q, scale, zero = with_min(q, f16(0)[:, None] * ls, f16(2)[:, None] * lm, 32)
        bits, integer = (4 if name == "Q4_K" else 8), False
    elif name == "Q6_K":
        ql, qh = b[:, 0:128].reshape(-1, 2, 64), b[:, 128:192].reshape(-1, 2, 32)
        low = np.stack([ql[:, :, :32] & 0xF, ql[:, :, 32:] & 0xF, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4], axis=2)
        high = np.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=2)
        q = (low | (high << 4)).reshape(-1, 16, 16)
        scale = f16(208)[:, None] * b[:, 192:208].view(np.int8).astype(np.float32)
        zero, bits, integer = np.full(scale.shape, 32.0, np.float32), 8, True
    else:
        raise KeyError(name)
    groups = q.shape[1] * nsb
    return (q.reshape(rows, groups, -1).astype(np.uint8), scale.reshape(rows, groups).astype(np.float32),
            zero.reshape(rows, groups).astype(np.float32), bits, integer,
            None if constant is None else constant.reshape(rows, groups))


def kquant_with_codes(name: str, blocks: np.ndarray, q: np.ndarray) -> None:
    """Overwrite the code bits of (rows, n_superblocks, type_size) `blocks` in place with
    q (rows, groups, group size), leaving scales, mins and super-scales as they are."""
    b = blocks.reshape(-1, blocks.shape[-1])
    q = q.reshape(b.shape[0], QK_K).astype(np.uint8)
    if name == "Q2_K":
        b[:, 16:80] = _pack_2bit(q)
    elif name == "Q3_K":
        hmask = ((q >> 2) & 1).reshape(-1, 8, 32)
        b[:, 0:32] = np.bitwise_or.reduce(hmask << np.arange(8, dtype=np.uint8).reshape(1, 8, 1), axis=1)
        b[:, 32:96] = _pack_2bit(q & 3)
    elif name == "Q4_K":
        b[:, 16:144] = _pack_nibbles64(q)
    elif name == "Q5_K":
        hi = (q >> 4).reshape(-1, 4, 2, 32)
        qh = np.zeros((b.shape[0], 32), np.uint8)
        for c in range(4):
            for h in range(2):
                qh |= hi[:, c, h] << np.uint8(2 * c + h)
        b[:, 16:48] = qh
        b[:, 48:176] = _pack_nibbles64(q & 0xF)
    elif name == "Q6_K":
        r = q.reshape(-1, 2, 4, 32)
        b[:, 0:128] = np.concatenate([(r[:, :, 0] & 0xF) | ((r[:, :, 2] & 0xF) << 4),
                                      (r[:, :, 1] & 0xF) | ((r[:, :, 3] & 0xF) << 4)], axis=2).reshape(-1, 128)
        b[:, 128:192] = ((r[:, :, 0] >> 4) | ((r[:, :, 1] >> 4) << 2) | ((r[:, :, 2] >> 4) << 4)
                         | ((r[:, :, 3] >> 4) << 6)).reshape(-1, 64)
    else:
        raise KeyError(name)
