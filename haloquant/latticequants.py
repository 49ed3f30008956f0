"""llama.cpp's lattice i-quants: IQ1_S, IQ1_M (1.56, 1.75 bits per weight), IQ2_XXS, IQ2_XS, IQ2_S
(≈ 2.06–2.56) and IQ3_XXS, IQ3_S (3.06, 3.44).

These types do not round weights one by one: a super-block of 256 weights has an fp16 scale, each
group of 16 or 32 weights a 4-bit sub-scale, and each group of 8 weights one point of a fixed grid
of non-negative 8- (IQ2) or two 4-vectors (IQ3) plus 8 sign bits — stored as 7 bits where the
number of minus signs must be even (`_XXS`, `_XS`). IQ1's grid points are signed (8 values in
{−1, 0, 1}, no sign bits) and each group adds an offset of ±1/8 (per 32 weights in IQ1_S, per 8 in
IQ1_M) before its scale. The encoder is llama.cpp's own (ggml's grid searches, through
ggml_quantize_chunk) with the calibration importance, which these types need.

`LatticeLayout` reads the per-group fields out of the bytes and writes them back, so GPTQ can take
ggml's scales for a block and choose every group's grid point and signs itself (`nearest`).
The decoding stays gguf's reference decoder: `LatticeBlocks.dequantize` equals it (tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gq

from haloquant.codec import AffineBlocks, Codec, register

GROUP = 8  # weights per sign byte: the unit GPTQ rounds at once
QK_K = 256  # weights per block of every lattice type


@dataclass(frozen=True)
class LatticeBlocks:
    """A lattice i-quant tensor as fields: `scale` (rows, groups) float32 — the decoder's multiplier
    of each group of 8 —, `index` (rows, groups, vectors per group) grid indices, `signs` (rows,
    groups) sign bytes (bit j set: weight j negative; None where the grid is signed), `offset` (rows,
    groups) added to each value before the scale (IQ1's ±1/8; None: 0)."""

    scale: np.ndarray
    index: np.ndarray
    signs: np.ndarray | None
    grid: np.ndarray  # (grid points, vector length) magnitudes, or signed values where signs is None
    offset: np.ndarray | None = None

    def levels(self) -> np.ndarray:
        """(rows, groups, 8): the decoder's values over their scale (integers but for IQ1's offsets)."""
        rows, groups = self.scale.shape
        values = self.grid[self.index].reshape(rows, groups, GROUP)
        if self.signs is not None:
            values = values * np.where((self.signs[..., None] >> np.arange(8, dtype=np.uint8)) & 1, np.float32(-1),
                                       np.float32(1))
        return values if self.offset is None else values + self.offset[..., None]

    def dequantize(self) -> np.ndarray:
        return (self.scale[..., None] * self.levels()).reshape(self.scale.shape[0], -1)


@dataclass(frozen=True)
class LatticeLayout:
    """One lattice type's byte layout (ggml-common.h's block_iq*): where each field lives."""

    ggml_type: GGMLQuantizationType
    type_size: int
    vector: int  # weights per grid point (8 or 4)
    parity: bool  # signs stored as 7 bits, an even number of minus signs implied
    scale_group: int  # weights per sub-scale (16 or 32)
    signed: bool = False  # the grid's points carry their signs (IQ1): no sign bits, an offset per group
    code_unit: int = 1  # integer codes per unit of level in the affine view (IQ1: 8, its offsets are ±1/8)

    @property
    def grid(self) -> np.ndarray:
        """(points, vector) magnitudes: gguf's reference decoder's own grid."""
        codec = getattr(gq, self.ggml_type.name)
        codec.init_grid()
        return codec.grid.reshape(-1, self.vector).astype(np.float32)

    def read(self, data: np.ndarray, shape: tuple[int, int]) -> LatticeBlocks:
        b = np.ascontiguousarray(data, dtype=np.uint8).reshape(shape[0], -1, self.type_size)
        scale, index, signs, offset = _READERS[self.ggml_type](b)
        rows = shape[0]
        return LatticeBlocks(scale.reshape(rows, -1).astype(np.float32), index.reshape(rows, -1, GROUP // self.vector),
                             None if signs is None else signs.reshape(rows, -1), self.grid,
                             None if offset is None else offset.reshape(rows, -1).astype(np.float32))

    def write(self, data: np.ndarray, shape: tuple[int, int], index: np.ndarray,
              signs: np.ndarray | None) -> np.ndarray:
        """The bytes with every group's grid indices and signs replaced; scales (and IQ1's offsets) kept."""
        b = np.array(data, dtype=np.uint8).reshape(shape[0], -1, self.type_size)
        nb = b.shape[1]
        index = np.asarray(index).reshape(shape[0], nb, -1).astype(np.uint32)
        if not self.signed:
            signs = np.asarray(signs, dtype=np.uint8).reshape(shape[0], nb, -1)
        if self.parity and (_popcount(signs) & 1).any():
            raise ValueError(f"{self.ggml_type.name}: sign bytes need an even number of minus signs")
        _WRITERS[self.ggml_type](b, index, signs)
        return b.reshape(shape[0], -1)

    @torch.no_grad()
    def nearest(self, x: torch.Tensor, grid: torch.Tensor, weight: torch.Tensor | None = None,
                offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (rows, 8): weights over their group scale → (grid indices (rows, 8 / vector), sign
        bytes (rows,), the values chosen (rows, 8)), minimising Σ weight·(x − value)² per group
        (`weight` (8,), e.g. GPTQ's 1/U_jj² of the columns; uniform if None). Signs follow x;
        where the type needs an even count of minus signs, the weight of least weight·x² takes the
        other sign (its target becomes −|x|, so the search gives it the smallest magnitude). A signed
        grid (IQ1) takes x − `offset` (rows,), the group's kept offset, and returns no sign bits (zeros)."""
        wt = torch.ones(GROUP, dtype=x.dtype, device=x.device) if weight is None else weight.to(x.dtype)
        if self.signed:
            shift = torch.zeros(x.shape[0], 1, dtype=x.dtype, device=x.device) if offset is None else \
                offset.to(x.dtype)[:, None]
            score = ((grid * grid) @ wt)[None] - 2 * ((x - shift) * wt) @ grid.T
            index = score.argmin(-1)
            return index[:, None], torch.zeros_like(index), grid[index] + shift
        neg = x < 0
        target = x.abs()
        if self.parity:
            odd = neg.sum(-1) % 2 == 1
            flip = torch.nn.functional.one_hot((wt * target * target).argmin(-1), GROUP).bool() & odd[:, None]
            neg ^= flip
            target = torch.where(flip, -target, target)
        per = GROUP // self.vector
        t, w = target.reshape(-1, per, self.vector), wt.reshape(per, self.vector)
        score = ((grid * grid) @ w.T).T[None] - 2 * torch.einsum("rvk,vk,gk->rvg", t, w, grid)
        index = score.argmin(-1)  # (rows, vectors per group)
        values = grid[index].reshape(x.shape) * torch.where(neg, -1.0, 1.0)
        bits = (neg.to(torch.int32) << torch.arange(GROUP, device=x.device)).sum(-1)
        return index, bits, values


def _popcount(b: np.ndarray) -> np.ndarray:
    return np.unpackbits(b[..., None], axis=-1).sum(-1)


_KSIGNS = np.frombuffer(gq.IQ2_XXS.ksigns, dtype=np.uint8)  # 7-bit index → sign byte with even parity
_SHIFT7 = np.array([0, 7, 14, 21], dtype=np.uint32)


def _f16(b: np.ndarray) -> np.ndarray:
    return b[..., 0:2].copy().view(np.float16).astype(np.float32)  # (rows, nb, 1)


def _nibbles(b: np.ndarray) -> np.ndarray:
    return np.stack([b & 0x0F, b >> 4], axis=-1).reshape(*b.shape[:-1], -1).astype(np.float32)


def _signs7(words: np.ndarray) -> np.ndarray:
    """uint32 words holding four 7-bit sign indices → (…, 4) sign bytes."""
    return _KSIGNS[(words[..., None] >> _SHIFT7) & 0x7F]


def _put_signs7(signs: np.ndarray) -> np.ndarray:
    return ((signs.astype(np.uint32) & 0x7F) << _SHIFT7).sum(-1, dtype=np.uint32)


def _read_iq2_xxs(b):
    qs = b[..., 2:66].copy().view(np.uint32).reshape(*b.shape[:2], 8, 2)
    db = _f16(b) * (np.float32(0.5) + (qs[..., 1] >> 28).astype(np.float32)) * np.float32(0.25)
    idx = qs[..., 0].copy().view(np.uint8).reshape(*b.shape[:2], 8, 4)
    return np.repeat(db, 4, axis=-1), idx, _signs7(qs[..., 1]), None


def _write_iq2_xxs(b, index, signs):
    qs = b[..., 2:66].copy().view(np.uint32).reshape(*b.shape[:2], 8, 2)
    qs[..., 0] = index.astype(np.uint8).reshape(*b.shape[:2], 8, 4).copy().view(np.uint32)[..., 0]
    qs[..., 1] = (qs[..., 1] & np.uint32(0xF0000000)) | _put_signs7(signs.reshape(*b.shape[:2], 8, 4))
    b[..., 2:66] = qs.reshape(*b.shape[:2], 16).view(np.uint8)


def _sub16_scales(b, d, start):
    """4-bit scales per 16 weights (IQ2_XS, IQ2_S) → per group of 8."""
    ls = _nibbles(b[..., start : start + 8])  # (rows, nb, 16)
    return np.repeat(d * (np.float32(0.5) + ls) * np.float32(0.25), 2, axis=-1)


def _read_iq2_xs(b):
    qs = b[..., 2:66].copy().view(np.uint16)
    return _sub16_scales(b, _f16(b), 66), (qs & 511)[..., None], _KSIGNS[qs >> 9], None


def _write_iq2_xs(b, index, signs):
    qs = index.astype(np.uint16) | ((signs.astype(np.uint16) & 0x7F) << 9)
    b[..., 2:66] = qs.view(np.uint8)


def _read_iq2_s(b):
    qh = (b[..., 66:74, None] >> np.array([0, 2, 4, 6], dtype=np.uint8)) & 3
    idx = b[..., 2:34].astype(np.uint16) | (qh.reshape(*b.shape[:2], 32).astype(np.uint16) << 8)
    return _sub16_scales(b, _f16(b), 74), idx[..., None], b[..., 34:66], None


def _write_iq2_s(b, index, signs):
    idx = index.astype(np.uint16)
    b[..., 2:34] = (idx & 0xFF).astype(np.uint8)
    b[..., 34:66] = signs
    hi = (idx >> 8).astype(np.uint8).reshape(*b.shape[:2], 8, 4) << np.array([0, 2, 4, 6], dtype=np.uint8)
    b[..., 66:74] = hi.sum(-1, dtype=np.uint8)


def _read_iq3_xxs(b):
    words = b[..., 66:98].copy().view(np.uint32)  # (rows, nb, 8): per 32 weights
    db = _f16(b) * (np.float32(0.5) + (words >> 28).astype(np.float32)) * np.float32(0.5)
    return np.repeat(db, 4, axis=-1), b[..., 2:66].reshape(*b.shape[:2], 32, 2), _signs7(words), None


def _write_iq3_xxs(b, index, signs):
    b[..., 2:66] = index.reshape(*b.shape[:2], 64).astype(np.uint8)
    words = b[..., 66:98].copy().view(np.uint32)
    words = (words & np.uint32(0xF0000000)) | _put_signs7(signs.reshape(*b.shape[:2], 8, 4))
    b[..., 66:98] = words.view(np.uint8)


def _read_iq3_s(b):
    qh = (b[..., 66:74, None] >> np.arange(8, dtype=np.uint8)) & 1
    idx = b[..., 2:66].astype(np.uint16) | (qh.reshape(*b.shape[:2], 64).astype(np.uint16) << 8)
    db = _f16(b) * (np.float32(1) + np.float32(2) * _nibbles(b[..., 106:110]))  # per 32 weights
    return np.repeat(db, 4, axis=-1), idx.reshape(*b.shape[:2], 32, 2), b[..., 74:106], None


def _write_iq3_s(b, index, signs):
    idx = index.reshape(*b.shape[:2], 64).astype(np.uint16)
    b[..., 2:66] = (idx & 0xFF).astype(np.uint8)
    b[..., 66:74] = np.packbits((idx >> 8).astype(np.uint8).reshape(*b.shape[:2], 8, 8), axis=-1,
                                bitorder="little")[..., 0]
    b[..., 74:106] = signs


_IQ1_DELTA = np.float32(gq.IQ1_S.delta)  # the offset's magnitude, 1/8


def _iq1_index(qs, high):
    return qs.astype(np.uint16) | (high.astype(np.uint16) << 8)


def _read_iq1_s(b):
    qh = b[..., 34:50].copy().view(np.uint16)  # (rows, nb, 8): per 32 weights
    db = _f16(b) * (2 * ((qh >> 12) & 7) + 1).astype(np.float32)
    offset = np.where(qh & 0x8000, -_IQ1_DELTA, _IQ1_DELTA)
    high = ((qh[..., None] >> np.array([0, 3, 6, 9], dtype=np.uint16)) & 7).reshape(*b.shape[:2], 32)
    return (np.repeat(db, 4, axis=-1), _iq1_index(b[..., 2:34], high)[..., None], None,
            np.repeat(offset, 4, axis=-1))


def _write_iq1_s(b, index, signs):
    idx = index.reshape(*b.shape[:2], 32).astype(np.uint16)
    b[..., 2:34] = (idx & 0xFF).astype(np.uint8)
    qh = b[..., 34:50].copy().view(np.uint16)
    high = ((idx >> 8) & 7).reshape(*b.shape[:2], 8, 4) << np.array([0, 3, 6, 9], dtype=np.uint16)
    qh = (qh & np.uint16(0xF000)) | high.sum(-1, dtype=np.uint16)
    b[..., 34:50] = qh.view(np.uint8)


_NIBBLE_SHIFT = np.array([12, 8, 4, 0], dtype=np.uint16)


def _iq1_m_d(b) -> np.ndarray:
    """IQ1_M's fp16 block scale (rows, nb) float32: 4 bits at the top of each of its 4 scale words."""
    sc = b[..., 48:56].copy().view(np.uint16)
    return np.bitwise_or.reduce((sc & np.uint16(0xF000)) >> _NIBBLE_SHIFT, axis=-1).astype(np.uint16).view(
        np.float16).astype(np.float32)


def _put_iq1_m_d(b, d: np.ndarray) -> None:
    sc = b[..., 48:56].copy().view(np.uint16)
    bits = np.asarray(d, np.float16).view(np.uint16)[..., None]
    sc = (sc & np.uint16(0x0FFF)) | (((bits << _NIBBLE_SHIFT) & np.uint16(0xF000)))
    b[..., 48:56] = sc.view(np.uint8)


def _iq1_m_nibbles(b) -> np.ndarray:
    """(rows, nb, 32) uint8: per group of 8, its index's high 3 bits and (bit 3) its offset's sign."""
    return np.stack([b[..., 32:48] & 0x0F, b[..., 32:48] >> 4], axis=-1).reshape(*b.shape[:2], 32)


def _read_iq1_m(b):
    sc = b[..., 48:56].copy().view(np.uint16)  # (rows, nb, 4): four 3-bit scales and 4 bits of d each
    d = _iq1_m_d(b)[..., None]
    ls = ((sc[..., None] >> np.array([0, 3, 6, 9], dtype=np.uint16)) & 7).reshape(*b.shape[:2], 16)
    nib = _iq1_m_nibbles(b)
    return (np.repeat(d * (2 * ls + 1).astype(np.float32), 2, axis=-1), _iq1_index(b[..., 0:32], nib & 7)[..., None],
            None, np.where(nib & 8, -_IQ1_DELTA, _IQ1_DELTA))


def _write_iq1_m(b, index, signs):
    idx = index.reshape(*b.shape[:2], 32).astype(np.uint16)
    b[..., 0:32] = (idx & 0xFF).astype(np.uint8)
    nib = (_iq1_m_nibbles(b) & 8) | ((idx >> 8) & 7).astype(np.uint8)
    b[..., 32:48] = nib[..., 0::2] | (nib[..., 1::2] << 4)


_T = GGMLQuantizationType
_READERS = {_T.IQ1_S: _read_iq1_s, _T.IQ1_M: _read_iq1_m, _T.IQ2_XXS: _read_iq2_xxs, _T.IQ2_XS: _read_iq2_xs,
            _T.IQ2_S: _read_iq2_s, _T.IQ3_XXS: _read_iq3_xxs,
            _T.IQ3_S: _read_iq3_s}
_WRITERS = {_T.IQ1_S: _write_iq1_s, _T.IQ1_M: _write_iq1_m, _T.IQ2_XXS: _write_iq2_xxs, _T.IQ2_XS: _write_iq2_xs,
            _T.IQ2_S: _write_iq2_s, _T.IQ3_XXS: _write_iq3_xxs,
            _T.IQ3_S: _write_iq3_s}
LATTICES: dict[str, LatticeLayout] = {
    "IQ1_S": LatticeLayout(_T.IQ1_S, 50, 8, False, 32, signed=True, code_unit=8),
    "IQ1_M": LatticeLayout(_T.IQ1_M, 56, 8, False, 16, signed=True, code_unit=8),
    "IQ2_XXS": LatticeLayout(_T.IQ2_XXS, 66, 8, True, 32),
    "IQ2_XS": LatticeLayout(_T.IQ2_XS, 74, 8, True, 16),
    "IQ2_S": LatticeLayout(_T.IQ2_S, 82, 8, False, 16),
    "IQ3_XXS": LatticeLayout(_T.IQ3_XXS, 98, 4, True, 32),
    "IQ3_S": LatticeLayout(_T.IQ3_S, 110, 4, False, 32),
}


def encode_lattice(name: str, w: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """ggml's encoder: its grid searches (uniform importance where the type needs one and none is given)."""
    from haloquant.formats import get_format
    from haloquant.llamacpp import ggml_quantize

    return ggml_quantize(get_format(name), w, importance)


def _affine(lay: LatticeLayout):
    """(rows, n, type_size) blocks → 8-bit codes around 128 under their sub-block scales: exact, since
    every grid value is an integer below 64 (IQ1's, times 8, an odd integer up to 9) (the form
    onnxruntime's MatMulNBits runs). GPTQ writes these types' grid points and signs itself
    (LatticeLayout.write), not codes of this view."""

    def parse(blocks: np.ndarray):
        rows = blocks.shape[0]
        f = lay.read(blocks, (rows, blocks.shape[1] * QK_K))
        q = (np.rint(f.levels() * lay.code_unit) + 128).astype(np.uint8).reshape(rows, -1, lay.scale_group)
        scale = np.ascontiguousarray(f.scale[:, :: lay.scale_group // GROUP]) / np.float32(lay.code_unit)
        return AffineBlocks(q, scale, np.full_like(scale, 128), 8, True)
    return parse


for _name, _lay in LATTICES.items():
    register(_name, Codec(_lay.ggml_type, lambda w, imp, device=None, name=_name: encode_lattice(name, w, imp),
                          _affine(_lay), llama_cpp_candidate=False,  # the encoder is llama.cpp's own
                          scale_fields=() if _name == "IQ1_M" else (0,),
                          packed_scale=(_iq1_m_d, _put_iq1_m_d) if _name == "IQ1_M" else None,
                          packed_scale_bytes=(48, 56) if _name == "IQ1_M" else (0, 0)))
