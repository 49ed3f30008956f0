"""How each quantized format is held in the ONNX export, and what that costs in bytes.

onnxruntime's integer kernels (MatMulNBits for linears, GatherBlockQuantized for the embedding)
take 2-, 4- or 8-bit codes in power-of-two groups of 16–256 with a float32 scale per group (the
graph is float32). MatMulNBits also takes a zero point per group — packed integers, or float32 for
2- and 4-bit codes; where a format's zero point is a float min of 4- or 8-bit codes (Q4_1, Q4_K,
Q5_1, Q5_K: refused for 8 bits, slow for 4), or for the lookup, whose zero point is fixed, the
weight is held as codes with the default zero point D (8 or 128) plus a float32 per-block offset
(D − zero)·scale. IQ4's table values
(−127…113) are held as 8-bit codes value + 128. So a format's ONNX size differs from its GGUF
size: Q4_0 5.0 bits per weight (GGUF 4.5), Q8_0 9.0 (8.5), Q4_K 6 (4.5), Q2_K 6 (2.625), Q5_K
10 (5.5). `onnx_weight_bytes` is what the allocation's ONNX budget counts (tasks/allocate.py) and
what the export writes (tests/test_onnx_target.py checks the two agree). Codes with one constant
integer zero point are shifted onto the kernel's default one (to_default_zero): no zero points stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from haloquant.formats import AffineBlocks, get_format


def ort_supports(blocks: AffineBlocks) -> bool:
    """MatMulNBits takes these codes, scales and zero points as they are — and runs them fast.
    It refuses 8-bit codes with float zero points; 4-bit ones it takes, but onnxruntime 1.32's CPU
    kernel then falls back to a path 20–30× slower (measured on SmolLM2-135M's export: 0.3 vs
    7–12 G weights/s), so those go the offset way too: (u − 8)·scale + a per-block offset, the
    same bytes as a float zero point (bench/results/onnx_edge_smollm2-135m.md)."""
    group = blocks.q.shape[-1]
    return (blocks.values is None and blocks.bits in (2, 4, 8) and valid_group(group)
            and not (blocks.bits in (4, 8) and not blocks.zero_is_integer))


def has_default_zero(blocks: AffineBlocks) -> bool:
    """Integer zero points that are MatMulNBits' own default 2^(bits−1): none need storing."""
    return blocks.zero_is_integer and bool(np.all(blocks.zero == 1 << (blocks.bits - 1)))


def valid_group(group: int) -> bool:
    return 16 <= group <= 256 and group & (group - 1) == 0


def to_default_zero(blocks: AffineBlocks) -> AffineBlocks:
    """Integer codes whose zero point is one constant z (the symmetric types: Q3_K's 4, Q6_K's 32,
    Q5_0's 16) shifted by 2^(bits−1) − z, where they still fit: then the kernel's default zero
    point is theirs and none is stored."""
    default = 1 << (blocks.bits - 1)
    if not blocks.zero_is_integer or blocks.values is not None or blocks.zero.size == 0:
        return blocks
    z = blocks.zero.flat[0]
    shift = int(default - z)
    if shift == 0 or not np.all(blocks.zero == z) or blocks.q.min() + shift < 0 or \
            blocks.q.max() + shift >= 1 << blocks.bits:
        return blocks
    q = (blocks.q.astype(np.int32) + shift).astype(blocks.q.dtype)
    return AffineBlocks(q, blocks.scale, blocks.zero + shift, blocks.bits, True, blocks.constant)


def integer_zero_form(blocks: AffineBlocks) -> tuple[AffineBlocks, np.ndarray]:
    """Any linear or table-coded blocks as 4- or 8-bit codes with onnxruntime's default zero point
    (8 or 128) plus a per-block offset (rows, groups): value = (u − D)·scale + offset. Codes narrower
    than their storage (2-bit in 4, 5-bit in 8) are centred on D (u = q + shift): held at u = q,
    (u − 128)·scale and the offset would each be ~100× the weight and cancel, costing float32 digits
    (seen: 2e-3 on logits). 4-bit codes in 4 bits stay as they are: a tied head shares them."""
    if blocks.values is None:
        if blocks.bits in (4, 8):
            blocks = to_default_zero(blocks)  # the same codes as the head's MatMulNBits, and no offset
        bits = 4 if blocks.bits <= 4 else 8
        default = 8 if bits == 4 else 128
        lo, hi = (int(blocks.q.min()), int(blocks.q.max())) if blocks.q.size else (0, 0)
        narrow = blocks.bits < bits or (bits == 8 and hi < 128)
        shift = default - (lo + hi + 1) // 2 if narrow and not np.all(blocks.zero == default) else 0
        u = (blocks.q.astype(np.int32) + shift).astype(np.uint8)
    else:
        bits, u, shift = 8, (blocks.values[blocks.q] + 128).astype(np.uint8), 128
    default = 8 if bits == 4 else 128
    offset = (((default - shift) - blocks.zero) * blocks.scale).astype(np.float32)
    return AffineBlocks(u, blocks.scale, np.full_like(blocks.zero, default), bits, True), offset


@dataclass(frozen=True)
class OnnxLayout:
    """A format's ONNX form, per group of `group` weights (None: a float32 weight)."""

    group: int
    direct_bits: int | None  # MatMulNBits takes the format's own codes (ort_supports), at these bits
    direct_float_zero: bool  # ... with float32 zero points (else packed integers)
    direct_default_zero: bool  # ... whose zero point is MatMulNBits' default 2^(bits−1): none stored
    integer_bits: int  # the codes of integer_zero_form (the lookup's, and MatMulNBits' otherwise)
    needs_offset: bool  # integer_zero_form leaves a non-zero offset

    def linear_bytes(self, rows: int, cols: int) -> int:
        groups = cols // self.group
        if self.direct_bits is not None:
            zeros = (4 * groups if self.direct_float_zero else
                     0 if self.direct_default_zero else -(-groups * self.direct_bits // 8))
            return rows * (cols * self.direct_bits // 8 + 4 * groups + zeros)
        if not self.needs_offset:  # integer codes whose zero point is the default one: none stored
            return rows * (cols * self.integer_bits // 8 + 4 * groups)
        return rows * (cols * self.integer_bits // 8 + 8 * groups)

    def gather_bytes(self, rows: int, cols: int) -> int:
        groups = cols // self.group
        return rows * (cols * self.integer_bits // 8 + 4 * groups + (4 * groups if self.needs_offset else 0))

    def tied_bytes(self, rows: int, cols: int) -> int:
        """Embedding and head from one weight: the lookup shares the head's codes and scales where
        both hold the same ones (and its offsets where the head has them too)."""
        scales = rows * 4 * (cols // self.group)
        if self.direct_bits is not None and self.direct_bits != self.integer_bits:  # 2-bit head codes
            return self.linear_bytes(rows, cols) + self.gather_bytes(rows, cols) - scales
        shared = rows * cols * self.integer_bits // 8 + scales
        if self.direct_bits is None and self.needs_offset:
            shared += scales  # the offsets: as many as the scales
        return self.linear_bytes(rows, cols) + self.gather_bytes(rows, cols) - shared


@lru_cache(maxsize=None)
def onnx_layout(fmt_name: str) -> OnnxLayout | None:
    """Read off one encoded block row of random weights: the layout is the format's, not the data's."""
    fmt = get_format(fmt_name)
    if fmt.is_float:
        return None
    shape = (2, 256)
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    blocks = fmt.affine_blocks(fmt.encode(w), shape)
    if blocks is None or not valid_group(blocks.q.shape[-1]):
        return None
    integer, offset = integer_zero_form(blocks)
    direct = ort_supports(blocks)
    shifted = to_default_zero(blocks)
    return OnnxLayout(group=blocks.q.shape[-1], direct_bits=blocks.bits if direct else None,
                      direct_float_zero=direct and not blocks.zero_is_integer,
                      direct_default_zero=direct and has_default_zero(shifted),
                      integer_bits=integer.bits,
                      needs_offset=bool(offset.any()))


def onnx_weight_bytes(fmt_name: str, shape: tuple[int, int], use: str) -> int:
    """Bytes of the ONNX initializers that hold this weight (codes, scales, zero points, offsets):
    `use` linear (a MatMul), gather (an untied embedding) or tied (embedding and head)."""
    layout = onnx_layout(fmt_name)
    rows, cols = shape
    if layout is None:
        return 4 * rows * cols * (2 if use == "tied" else 1)  # float32 (a tied pair: Gather and MatMul)
    return {"linear": layout.linear_bytes, "gather": layout.gather_bytes, "tied": layout.tied_bytes}[use](rows, cols)
