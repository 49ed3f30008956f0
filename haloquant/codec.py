"""What one llama.cpp tensor type is to haloquant, and the table of them.

A codec module — `haloquant.kquants` (Q2_K … Q6_K), `haloquant.iquants` (IQ4_NL, IQ4_XS),
`haloquant.latticequants` (IQ1_S … IQ3_S), `haloquant.legacyquants` (Q4_0 … Q8_0) — holds a
type's byte layout and encoder and registers one `Codec` per type; `haloquant.formats` makes its
formats from this table. A new type is one module and a `register` call: its encoder, and for a
type whose weights are integer codes on a grid, the view of its bytes as those codes (what GPTQ
rounds on and the ONNX export stores) and how codes are written back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType


@dataclass(frozen=True)
class AffineBlocks:
    """Integer codes q (rows, groups, group_size) in [0, 2**bits), with per-group float32 scale and
    zero point: weight = (q − zero) · scale. `zero_is_integer` when zero is an exact integer."""

    q: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    bits: int
    zero_is_integer: bool
    constant: np.ndarray | None = None  # (rows, groups): groups whose value ignores the codes (zero scale)
    values: np.ndarray | None = None  # non-linear types: code q stands for values[q]

    def level(self, q: np.ndarray) -> np.ndarray:
        return q.astype(np.float32) if self.values is None else self.values[q]

    def dequantize(self) -> np.ndarray:
        w = (self.level(self.q) - self.zero[..., None]) * self.scale[..., None]
        return w.reshape(self.q.shape[0], -1)


@dataclass(frozen=True)
class Codec:
    """One tensor type's encoder and grid. Bytes are always (rows, blocks per row, type size)
    arrays of llama.cpp's blocks; `affine` and `write_codes` are None where the type has no
    integer-code view of that form (the lattice i-quants: GPTQ writes their grid points itself)."""

    ggml_type: GGMLQuantizationType
    encode: Callable[..., np.ndarray]  # (weight, importance | None, device | None) → block bytes (rows, bytes)
    affine: Callable[[np.ndarray], AffineBlocks] | None = None  # blocks → codes, scales, zero points
    write_codes: Callable[[np.ndarray, np.ndarray], None] | None = None  # (blocks, q) in place, scales kept
    max_code: int | None = None  # largest integer code of the affine view
    code_values: np.ndarray | None = None  # the table a code indexes (IQ4); None: code q stands for q
    # also try llama.cpp's quantizer block by block and keep the better block (formats.QuantFormat.encode);
    # off where llama.cpp's block measurably never wins (bench/results/llama_cpp_candidate_ref-llama-a.md)
    llama_cpp_candidate: bool = True
    # byte offsets, within a block, of the fp16 fields that scale the whole decoded block together (d, and
    # the min's dmin/m where there is one): multiplying each by α multiplies the block by α (row_scale.py)
    scale_fields: tuple[int, ...] = ()
    # a block's fp16 scale stored in pieces (IQ1_M: 4 bits at the top of each of its 4 scale words), as
    # (read: blocks → float32 (rows, blocks), write: (blocks, fp16 (rows, blocks)) in place), and the byte
    # range holding it: rescaled like a scale field
    packed_scale: tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray, np.ndarray], None]] | None = None
    packed_scale_bytes: tuple[int, int] = (0, 0)


CODECS: dict[str, Codec] = {}


def register(name: str, codec: Codec) -> None:
    """Add a tensor type under its llama.cpp name (as `GGMLQuantizationType` spells it)."""
    if name in CODECS:
        raise ValueError(f"codec {name} is registered twice")
    if GGMLQuantizationType[name] != codec.ggml_type:
        raise ValueError(f"codec {name} is registered with ggml type {codec.ggml_type.name}")
    CODECS[name] = codec
