"""gguf's reference decoders in torch: block bytes → float32 weights on any device, bit for bit.

The stages that measure or run quantized weights (sensitivity's candidates, the quantized model of
validate, block tuning, sequential GPTQ) decode whole tensors. gguf-py's numpy decoder does that on
one CPU core at ~130 M weights/s: ~10 s per Llama-3-8B decoder block for sensitivity's six
candidate formats, while the GPU encodes the same block in ~5 s. These are the same operations as
`gguf.quants.<TYPE>.dequantize_blocks` — the same integer unpacking and the same float32
multiplies and subtractions in the same order, each correctly rounded, so the values are equal bit
for bit on the CPU and on CUDA (tests/test_decoders.py checks every type against gguf). Types not
here (the lattice i-quants) decode through gguf on the host (`decode_torch` falls back).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants as gq

QK_K = 256
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) little-endian bytes → (n, 1) float32."""
    return b.contiguous().view(torch.float16).float()


def _shifted(b: torch.Tensor, shifts: list[int], dim_shape: tuple[int, ...]) -> torch.Tensor:
    return b >> torch.tensor(shifts, dtype=b.dtype, device=b.device).reshape(dim_shape)


def _u32(b: torch.Tensor) -> torch.Tensor:
    """(n, 4) little-endian bytes → (n, 1) int64."""
    b = b.long()
    return (b[:, 0:1] | (b[:, 1:2] << 8) | (b[:, 2:3] << 16) | (b[:, 3:4] << 24))


def _q4_0(b):
    n = b.shape[0]
    d, qs = _f16(b[:, :2]), b[:, 2:]
    qs = _shifted(qs.reshape(n, -1, 1, 16), [0, 4], (1, 1, 2, 1))
    qs = (qs & 0x0F).reshape(n, -1).to(torch.int8) - 8
    return d * qs.float()


def _q4_1(b):
    n = b.shape[0]
    d, m, qs = _f16(b[:, :2]), _f16(b[:, 2:4]), b[:, 4:]
    qs = _shifted(qs.reshape(n, -1, 1, 16), [0, 4], (1, 1, 2, 1))
    qs = (qs & 0x0F).reshape(n, -1).float()
    return d * qs + m


def _q5_high(qh: torch.Tensor) -> torch.Tensor:
    n = qh.shape[0]
    bits = _u32(qh) >> torch.arange(32, device=qh.device).reshape(1, 32)
    return (bits & 1).to(torch.uint8).reshape(n, 32)


def _q5_low(qs: torch.Tensor) -> torch.Tensor:
    n = qs.shape[0]
    return (_shifted(qs.reshape(n, -1, 1, 16), [0, 4], (1, 1, 2, 1)) & 0x0F).reshape(n, -1)


def _q5_0(b):
    d, qh, qs = _f16(b[:, :2]), b[:, 2:6], b[:, 6:]
    q = (_q5_low(qs) | (_q5_high(qh) << 4)).to(torch.int8) - 16
    return d * q.float()


def _q5_1(b):
    d, m, qh, qs = _f16(b[:, :2]), _f16(b[:, 2:4]), b[:, 4:8], b[:, 8:]
    q = (_q5_low(qs) | (_q5_high(qh) << 4)).float()
    return d * q + m


def _q8_0(b):
    d, x = _f16(b[:, :2]), b[:, 2:].contiguous().view(torch.int8).float()
    return x * d


def _q2_k(b):
    n = b.shape[0]
    scales, qs, d, dmin = b[:, :16], b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0xF).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    qs = _shifted(qs.reshape(n, -1, 1, 32), [0, 2, 4, 6], (1, 1, 4, 1)) & 3
    qs = qs.reshape(n, 16, 16).float()
    return (dl * qs - ml).reshape(n, -1)


def _q3_k(b):
    n = b.shape[0]
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    lscales = _shifted(scales[:, :8].reshape(n, 1, 8), [0, 4], (1, 2, 1)).reshape(n, 16)
    hscales = _shifted(scales[:, 8:].reshape(n, 1, 4), [0, 2, 4, 6], (1, 4, 1)).reshape(n, 16)
    sc = (lscales & 0x0F) | ((hscales & 0x03) << 4)
    dl = (d * (sc.to(torch.int8) - 32).float()).reshape(n, 16, 1)
    ql = _shifted(qs.reshape(n, -1, 1, 32), [0, 2, 4, 6], (1, 1, 4, 1)).reshape(n, 16, 16) & 3
    qh = _shifted(hmask.reshape(n, -1, 1, 32), list(range(8)), (1, 1, 8, 1)).reshape(n, 16, 16) & 1
    q = (ql.to(torch.int8) - ((qh ^ 1) << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, m_d = s[:, 0:1], s[:, 1:2], s[:, 2:3]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], -1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], -1)
    return sc.reshape(n, 8), mn.reshape(n, 8)


def _q4_k(b):
    n = b.shape[0]
    d, dmin, scales, qs = _f16(b[:, :2]), _f16(b[:, 2:4]), b[:, 4:16], b[:, 16:]
    sc, m = _scale_min_k4(scales)
    d = (d * sc.float()).reshape(n, -1, 1)
    dm = (dmin * m.float()).reshape(n, -1, 1)
    qs = (_shifted(qs.reshape(n, -1, 1, 32), [0, 4], (1, 1, 2, 1)) & 0x0F).reshape(n, -1, 32).float()
    return (d * qs - dm).reshape(n, QK_K)


def _q5_k(b):
    n = b.shape[0]
    d, dmin, scales, qh, qs = _f16(b[:, :2]), _f16(b[:, 2:4]), b[:, 4:16], b[:, 16:48], b[:, 48:]
    sc, m = _scale_min_k4(scales)
    d = (d * sc.float()).reshape(n, -1, 1)
    dm = (dmin * m.float()).reshape(n, -1, 1)
    ql = (_shifted(qs.reshape(n, -1, 1, 32), [0, 4], (1, 1, 2, 1)) & 0x0F).reshape(n, -1, 32)
    qh = (_shifted(qh.reshape(n, -1, 1, 32), list(range(8)), (1, 1, 8, 1)) & 1).reshape(n, -1, 32)
    q = (ql | (qh << 4)).float()
    return (d * q - dm).reshape(n, QK_K)


def _q6_k(b):
    n = b.shape[0]
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    d = (d * scales.contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    ql = (_shifted(ql.reshape(n, -1, 1, 64), [0, 4], (1, 1, 2, 1)) & 0x0F).reshape(n, -1, 32)
    qh = (_shifted(qh.reshape(n, -1, 1, 32), [0, 2, 4, 6], (1, 1, 4, 1)) & 3).reshape(n, -1, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, 16, -1).float()
    return (d * q).reshape(n, QK_K)


def _iq4_nl(b):
    n = b.shape[0]
    d, qs = _f16(b[:, :2]), b[:, 2:]
    qs = (_shifted(qs.reshape(n, -1, 1, 16), [0, 4], (1, 1, 2, 1)) & 0x0F).reshape(n, -1)
    values = torch.tensor(IQ4_VALUES, dtype=torch.float32, device=b.device)
    return d * values[qs.long()]


def _iq4_xs(b):
    n = b.shape[0]
    d, sh, sl, qs = _f16(b[:, :2]), b[:, 2:4].long(), b[:, 4:8], b[:, 8:]
    scales_h = (sh[:, 0:1] | (sh[:, 1:2] << 8)) >> torch.arange(0, 16, 2, device=b.device).reshape(1, 8)
    scales_l = _shifted(sl.reshape(n, -1, 1), [0, 4], (1, 1, 2)).reshape(n, -1) & 0x0F
    scales = (scales_l.long() | ((scales_h & 0x03) << 4)) - 32
    dl = (d * scales.float()).reshape(n, -1, 1)
    qs = (_shifted(qs.reshape(n, -1, 1, 16), [0, 4], (1, 1, 2, 1)).reshape(n, -1, 32) & 0x0F)
    values = torch.tensor(IQ4_VALUES, dtype=torch.float32, device=b.device)
    return (dl * values[qs.long()]).reshape(n, -1)


DECODERS: dict[T, Callable[[torch.Tensor], torch.Tensor]] = {
    T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1, T.Q8_0: _q8_0,
    T.Q2_K: _q2_k, T.Q3_K: _q3_k, T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k,
    T.IQ4_NL: _iq4_nl, T.IQ4_XS: _iq4_xs,
}


def decode_torch(data: np.ndarray | torch.Tensor, ggml_type: T, shape: tuple[int, ...],
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Block bytes (rows × bytes per row, numpy or torch) → float32 tensor of `shape` on `device`,
    equal bit for bit to `gguf.quants.dequantize`."""
    if ggml_type not in DECODERS and ggml_type not in (T.F32, T.F16):
        raw = data.cpu().numpy() if isinstance(data, torch.Tensor) else data
        raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(shape[0], -1)
        return torch.from_numpy(gq.dequantize(raw, ggml_type).astype(np.float32).reshape(shape)).to(device)
    b = torch.as_tensor(np.ascontiguousarray(data)) if isinstance(data, np.ndarray) else data
    b = b.to(device=device, dtype=torch.uint8).reshape(-1)
    if ggml_type == T.F32:
        return b.view(torch.float32).reshape(shape).clone()
    if ggml_type == T.F16:
        return b.view(torch.float16).float().reshape(shape)
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    return DECODERS[ggml_type](b.reshape(-1, type_size)).reshape(shape)
