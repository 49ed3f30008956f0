"""llama.cpp's legacy block-32 types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: layouts and importance-weighted fits.

These are the types of every width that is not a multiple of 256 (SmolLM2's 576, Qwen2.5's 896,
Gemma 3's 640 and 1152), where no k-quant fits. Each block is 32 weights with an fp16 scale
(and, for Q4_1/Q5_1, an fp16 min): `d·(q − zero)` or `d·q + m`.

Without importance the encoder is gguf's reference quantizer, which is llama.cpp's own without an
imatrix (the same bytes). With importance it fits each block to importance-weighted error with
llama.cpp's imatrix weights `imp·sqrt(σ²_row + x²)`: for the symmetric types ggml's search
(make_qx_quants), for those with a min the scale-and-min search of the k-quants
(`kquants.fit_scale_min`, on ggml's make_qkx3 step grid but with the block's min as the codes'
origin throughout, where ggml moves it as it goes). Then, unlike ggml, which keeps the codes
rounded against the unrounded fp32 scale, every code is re-rounded against the fp16 scale and min
the block really stores. `QuantFormat.encode` keeps, block by block, the better of this and
llama.cpp's own imatrix fit: two different searches beat either (bench/llama_cpp_candidate.py).
Q8_0 has no imatrix path in llama.cpp either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gq

from haloquant.arrays import on_device, to_host
from haloquant.codec import AffineBlocks, Codec, register
from haloquant.kquants import fit_scale_min, fit_scale_symmetric, with_min

QK = 32
_CHUNK = 1 << 16  # blocks per vectorised pass (bounds temporary memory to a few tens of MB)


# ---------------------------------------------------------------- layout: bytes ↔ codes

def f16_at(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The fp16 at byte `offset` of every block, as float32."""
    return blocks[..., offset : offset + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml legacy layout: element j in the low nibble of byte j, element j+16 in the high nibble."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    return (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)


def _high_bits(blocks: np.ndarray, offset: int) -> np.ndarray:
    qh = blocks[..., offset : offset + 4].copy().view(np.uint32)
    return ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _pack_high_bits(q: np.ndarray) -> np.ndarray:
    bits = ((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    return np.bitwise_or.reduce(bits, axis=-1).astype(np.uint32)[..., None].view(np.uint8)


@dataclass(frozen=True)
class LegacyLayout:
    """Where a legacy type keeps its fp16 scale, fp16 min (None: symmetric, zero point `zero`),
    the 5th code bits (None: 4 or 8-bit codes) and the low code bits; `nmax`: codes are 0…nmax."""

    ggml_type: GGMLQuantizationType
    nmax: int
    qs: int
    zero: float = 0.0
    m: int | None = None
    qh: int | None = None

    def codes(self, blocks: np.ndarray) -> np.ndarray:
        """(…, 32) integer codes 0…nmax of every block."""
        if self.nmax == 255:
            return (blocks[..., self.qs : self.qs + 32].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        q = nibbles(blocks[..., self.qs : self.qs + 16])
        return q if self.qh is None else q | (_high_bits(blocks, self.qh) << 4)

    def put_codes(self, blocks: np.ndarray, q: np.ndarray) -> None:
        """Write codes (…, 32) into the blocks in place, scales kept."""
        if self.nmax == 255:
            blocks[..., self.qs : self.qs + 32] = (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
            return
        if self.qh is not None:
            blocks[..., self.qh : self.qh + 4] = _pack_high_bits(q)
        blocks[..., self.qs : self.qs + 16] = pack_nibbles(q & 0xF)

    @property
    def bits(self) -> int:
        return int(self.nmax).bit_length()


_T = GGMLQuantizationType
LAYOUTS: dict[str, LegacyLayout] = {
    "Q4_0": LegacyLayout(_T.Q4_0, 15, qs=2, zero=8.0),
    "Q4_1": LegacyLayout(_T.Q4_1, 15, qs=4, m=2),
    "Q5_0": LegacyLayout(_T.Q5_0, 31, qs=6, zero=16.0, qh=2),
    "Q5_1": LegacyLayout(_T.Q5_1, 31, qs=8, m=2, qh=4),
    "Q8_0": LegacyLayout(_T.Q8_0, 255, qs=2, zero=128.0),
}


# ---------------------------------------------------------------- encoding

def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def _fit_blocks(lay: LegacyLayout, x: np.ndarray, w: np.ndarray, device=None) -> np.ndarray:
    """Blocks (n, type size) for x, w of shape (n, 32); the scale searches on `device` (torch) or
    in numpy (None), the same bytes either way."""
    xd, wd = on_device(x, device), on_device(w, device)
    size = gq.GGML_QUANT_SIZES[lay.ggml_type][1]
    out = np.zeros((x.shape[0], size), np.uint8)
    if lay.m is None:  # d·(q − zero): the largest |x| onto −zero, as ggml (codes −zero … zero − 1)
        d = _fp16(to_host(fit_scale_symmetric(xd, wd, int(lay.zero))))
        safe = np.where(d != 0, d, 1)
        q = np.where(d[:, None] != 0, np.clip(np.rint(x / safe[:, None]), -lay.zero, lay.zero - 1), 0) + lay.zero
    else:  # d·q + m with m ≤ 0 (ggml make_qkx3_quants' step grid: rmin −0.9, rdelta 0.05, 36 steps)
        scale, neg_min = map(to_host, fit_scale_min(xd, wd, lay.nmax, -0.9, 0.05, 36))
        d, m = _fp16(scale), _fp16(-neg_min)
        safe = np.where(d != 0, d, 1)
        q = np.where(d[:, None] != 0, np.clip(np.rint((x - m[:, None]) / safe[:, None]), 0, lay.nmax), 0)
        out[:, lay.m : lay.m + 2] = m.astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    lay.put_codes(out, q.astype(np.uint8))
    return out


def encode_legacy(name: str, weight: np.ndarray, importance: np.ndarray | None = None,
                  device=None) -> np.ndarray:
    """Float matrix (rows, cols) → llama.cpp's block bytes (rows, cols/32 · type size); `device`:
    where the imatrix scale searches run (a torch device; None: numpy)."""
    lay = LAYOUTS[name]
    w32 = np.ascontiguousarray(weight, dtype=np.float32)
    if importance is None or name == "Q8_0":
        return gq.quantize(w32, lay.ggml_type)
    rows, cols = w32.shape
    nb = cols // QK
    sigma2 = (w32.astype(np.float64) ** 2).mean(1)  # llama.cpp: over the whole row
    imp = np.asarray(importance, np.float32).reshape(1, nb, QK)
    x = w32.reshape(rows * nb, QK)
    wt = (imp * np.sqrt(sigma2[:, None, None] + w32.reshape(rows, nb, QK) ** 2)).astype(np.float32).reshape(rows * nb, QK)
    step = _CHUNK if device is None else _CHUNK * 8
    parts = [_fit_blocks(lay, x[i : i + step], wt[i : i + step], device) for i in range(0, x.shape[0], step)]
    return np.concatenate(parts).reshape(rows, -1)


# ---------------------------------------------------------------- affine view and registration

def _affine(lay: LegacyLayout) -> Callable[[np.ndarray], AffineBlocks]:
    """5-bit codes are viewed as 8-bit ones (onnxruntime's MatMulNBits takes 2, 4 or 8 bits)."""
    bits = 4 if lay.nmax == 15 else 8

    def parse(b):
        q, d = lay.codes(b), f16_at(b, 0)
        if lay.m is None:
            return AffineBlocks(q, d, np.full_like(d, lay.zero), bits, True)
        q, scale, zero, constant = with_min(q, d, -f16_at(b, lay.m), QK)
        return AffineBlocks(q, scale, zero, bits, False, constant)
    return parse


for _name, _lay in LAYOUTS.items():
    register(_name, Codec(_lay.ggml_type, lambda w, imp, device=None, name=_name: encode_legacy(name, w, imp, device),
                          _affine(_lay), _lay.put_codes, _lay.nmax,
                          llama_cpp_candidate=_name != "Q8_0",  # Q8_0: llama.cpp has no imatrix path either
                          scale_fields=(0,) if _lay.m is None else (0, _lay.m)))
