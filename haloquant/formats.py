"""Weight storage formats: one interface for every llama.cpp tensor type haloquant writes.

A `QuantFormat` knows its real storage cost (scales and mins included), its block shape, and how
to encode a float matrix into llama.cpp's exact block bytes and decode them back. The allocation's
candidate set is just a list of format names; the bytes the quantize stage stores are the bytes
the GGUF holds, so what validation measures is what llama.cpp runs.

Each type's encoder and byte layout live in its codec module: the k-quants in `haloquant.kquants`,
IQ4_NL / IQ4_XS in `haloquant.iquants`, the lattice i-quants (IQ2_XXS … IQ3_S) in
`haloquant.latticequants`, the legacy block-32 types (Q4_0 … Q8_0) in
`haloquant.legacyquants`. Decoding goes through `gguf.quants.dequantize`, the reference decoder,
or its torch port (`haloquant.decoders`: the same values bit for bit, on the CPU or a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq

from haloquant import HaloquantError
from haloquant.arrays import sum_last
from haloquant.decoders import decode_torch
from haloquant.iquants import KVALUES, encode_iq4
from haloquant.kquants import affine_kquant, encode_kquant, kquant_with_codes
from haloquant.latticequants import LATTICES, LatticeLayout, encode_lattice
from haloquant.legacyquants import ENCODERS as LEGACY_ENCODERS, LAYOUTS, LegacyLayout, f16_at, nibbles, pack_nibbles


@dataclass(frozen=True)
class QuantFormat:
    """A llama.cpp tensor type, seen as a codec for 2-D weight matrices (rows × cols)."""

    name: str
    ggml_type: GGMLQuantizationType
    encoder: Callable[..., np.ndarray] | None = None  # (weight, importance, device) → block bytes
    # also try llama.cpp's quantizer block by block and keep the better block; off where llama.cpp's
    # block measurably never wins (IQ4_NL, Q8_0: bench/results/llama_cpp_candidate_ref-llama-a.md)
    llama_cpp_candidate: bool = True

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.ggml_type][0]

    @property
    def type_size(self) -> int:
        """Bytes of one block."""
        return GGML_QUANT_SIZES[self.ggml_type][1]

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    @property
    def is_float(self) -> bool:
        return self.ggml_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16)

    def supports(self, shape: tuple[int, ...]) -> bool:
        return shape[-1] % self.block_size == 0

    def storage_bytes(self, shape: tuple[int, ...]) -> int:
        if not self.supports(shape):
            raise HaloquantError(
                f"format {self.name} needs rows whose length is a multiple of {self.block_size}; "
                f"got shape {tuple(shape)}"
            )
        n = int(np.prod(shape))
        return n // self.block_size * self.type_size

    @property
    def is_kquant(self) -> bool:
        return self.name.endswith("_K")

    @property
    def lattice(self) -> LatticeLayout | None:
        """The byte layout of a lattice i-quant (groups of 8 weights on a vector grid: GPTQ rounds
        them a group at a time); None for the other types."""
        return LATTICES.get(self.name)

    def encode(self, weight: np.ndarray, importance: np.ndarray | None = None,
               threads: int | None = None, device=None) -> np.ndarray:
        """Float matrix → uint8 array (rows, bytes per row) holding llama.cpp's block bytes.

        `importance` (one weight per input column, e.g. diag(XᵀX)) weights the scale fits. For
        the formats with `llama_cpp_candidate`, each block keeps the better (by importance-weighted
        error) of haloquant's own fit and llama.cpp's quantizer with the same importance, so the
        result is never worse than llama.cpp's, block by block. `threads`: row chunks encoded side
        by side (default: the process's torch thread count); the bytes do not depend on it.
        `device` (a torch device, e.g. "cuda"): where haloquant's own scale searches run, in torch
        — the same bytes as numpy's (haloquant.arrays); llama.cpp's blocks are made on the CPU."""
        w = np.ascontiguousarray(weight, dtype=np.float32)
        self.storage_bytes(w.shape)  # validates the row length
        if self.ggml_type == GGMLQuantizationType.F32:
            out = w
        elif self.ggml_type == GGMLQuantizationType.F16:
            out = w.astype(np.float16)
        elif device is not None and self.llama_cpp_candidate:
            out = self._encode_on_device(w, importance, threads, device)
        else:
            out = by_row_chunks(lambda rows: self._encode_rows(rows, importance, device), w,
                                threads if device is None else 1)
        return np.ascontiguousarray(out).view(np.uint8).reshape(w.shape[0], -1)

    def _encode_on_device(self, w: np.ndarray, importance: np.ndarray | None, threads: int | None,
                          device) -> np.ndarray:
        """The whole tensor's own fit on the device while llama.cpp's blocks are made on the CPU's
        threads beside it (ggml releases the GIL), then the choice block by block on the device:
        the same bytes as the CPU path, at the cost of the slower of the two."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            theirs = pool.submit(by_row_chunks, lambda rows: _llama_cpp_encoding(self, rows, importance), w, threads)
            own = self._own_rows(w, importance, device)
            return self.best_blocks(w, importance, own, theirs.result(), device=device)

    def own_fit_only(self) -> "QuantFormat":
        """This format without llama.cpp's per-block candidate (same bytes layout and decoder)."""
        return self if not self.llama_cpp_candidate else replace(self, llama_cpp_candidate=False)

    def encode_own(self, weight: np.ndarray, importance: np.ndarray | None = None,
                   threads: int | None = None, device=None) -> np.ndarray:
        """haloquant's own fit alone, without llama.cpp's blocks (bench/llama_cpp_candidate.py
        measures what the comparison adds)."""
        w = np.ascontiguousarray(weight, dtype=np.float32)
        return by_row_chunks(lambda rows: self._own_rows(rows, importance, device), w,
                             threads if device is None else 1)

    def _own_rows(self, w: np.ndarray, importance: np.ndarray | None, device=None) -> np.ndarray:
        own = self.encoder(w, importance, device) if self.encoder is not None else gq.quantize(w, self.ggml_type)
        return np.ascontiguousarray(own).view(np.uint8).reshape(w.shape[0], -1)

    def _encode_rows(self, w: np.ndarray, importance: np.ndarray | None, device=None) -> np.ndarray:
        own = self._own_rows(w, importance, device)
        if not self.llama_cpp_candidate:
            return own
        out = self.best_blocks(w, importance, own, _llama_cpp_encoding(self, w, importance))
        return np.ascontiguousarray(out).view(np.uint8).reshape(w.shape[0], -1)

    def best_blocks(self, w: np.ndarray, importance: np.ndarray | None, *candidates: np.ndarray,
                    device=None) -> np.ndarray:
        """Per block, the candidate encoding with the lowest importance-weighted squared error.
        Blocks are self-contained, so mixing candidates block by block gives valid data. `device`:
        the errors are computed there in torch — the same float32 values as numpy's (the decoders
        and `sum_last` are numpy's bit for bit), so the same blocks are chosen."""
        rows, nb = w.shape[0], w.shape[1] // self.block_size
        imp = np.ones(w.shape[1], np.float32) if importance is None else np.asarray(importance, np.float32)
        if device is None:
            errs = [(((self.decode(c, w.shape) - w) ** 2) * imp).reshape(rows, nb, -1).sum(-1) for c in candidates]
            pick = np.argmin(np.stack(errs), axis=0)  # (rows, blocks); ties keep the first (own) candidate
        else:
            wt, it = torch.from_numpy(w).to(device), torch.from_numpy(imp).to(device)
            errs = [sum_last((((self.decode_torch(c, w.shape, device) - wt) ** 2) * it).reshape(rows, nb, -1))
                    for c in candidates]
            pick = torch.argmin(torch.stack(errs), dim=0).cpu().numpy()  # ties: the first, as numpy
        stacked = np.stack([c.reshape(rows, nb, self.type_size) for c in candidates])
        return np.take_along_axis(stacked, pick[None, :, :, None], axis=0)[0].reshape(rows, -1)

    def decode(self, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Block bytes → float32 matrix of `shape`, through gguf's reference decoder."""
        data = np.ascontiguousarray(data, dtype=np.uint8).reshape(shape[0], -1)
        if self.ggml_type == GGMLQuantizationType.F32:
            return data.view(np.float32).reshape(shape).copy()
        if self.ggml_type == GGMLQuantizationType.F16:
            return data.view(np.float16).astype(np.float32).reshape(shape)
        return gq.dequantize(data, self.ggml_type).astype(np.float32).reshape(shape)

    def decode_torch(self, data: np.ndarray, shape: tuple[int, ...], device="cpu") -> torch.Tensor:
        """The same values as `decode`, bit for bit, as a float32 tensor made on `device`: on a GPU
        the bytes travel and the weights are decoded there (haloquant/decoders.py)."""
        return decode_torch(data, self.ggml_type, shape, device)

    def affine_blocks(self, data: np.ndarray, shape: tuple[int, ...]) -> "AffineBlocks | None":
        """The format's bytes as integer codes with a scale and zero point per group, such that
        (q − zero) · scale = decode(data) — (values[q] − zero) · scale for the IQ4 types, whose
        codes index a fixed table; for the lattice i-quants 8-bit codes 128 + the signed grid value
        (an integer) per weight; None where the format is not of that form (floats)."""
        blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(shape[0], -1, self.type_size)
        if self.is_kquant:
            return AffineBlocks(*affine_kquant(self.name, blocks))
        if self.lattice is not None:
            return _affine_lattice(self.lattice, data, shape)
        parse = _AFFINE_PARSERS.get(self.ggml_type)
        return None if parse is None else parse(blocks)

    @property
    def code_values(self) -> np.ndarray | None:
        """The table a code indexes (IQ4_NL, IQ4_XS); None where code q stands for q itself."""
        return KVALUES if self.ggml_type in (GGMLQuantizationType.IQ4_NL, GGMLQuantizationType.IQ4_XS) else None

    @property
    def max_code(self) -> int:
        """Largest integer code of the format's affine view."""
        return {"Q2_K": 3, "Q3_K": 7, "Q4_K": 15, "Q5_K": 31, "Q6_K": 63, "Q4_0": 15, "Q4_1": 15, "Q5_0": 31,
                "Q5_1": 31, "Q8_0": 255, "IQ4_NL": 15, "IQ4_XS": 15}[self.name]

    def with_codes(self, data: np.ndarray, shape: tuple[int, ...], q: np.ndarray) -> np.ndarray:
        """Block bytes with every code replaced by `q` (rows, groups, group size), scales kept —
        how GPTQ writes its own rounding into the grid it fixed."""
        blocks = np.array(data, dtype=np.uint8).reshape(shape[0], -1, self.type_size)
        q = np.asarray(q, dtype=np.uint8).reshape(blocks.shape[0], blocks.shape[1], -1)
        if self.is_kquant:
            kquant_with_codes(self.name, blocks, q)
        else:
            _CODE_WRITERS[self.ggml_type](blocks, q)
        return blocks.reshape(shape[0], -1)

    def roundtrip(self, weight: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
        """decode(encode(weight)): the weight as the runtime will see it."""
        return self.decode(self.encode(weight, importance), weight.shape)


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


def _with_min(q: np.ndarray, d: np.ndarray, m: np.ndarray, bits: int) -> AffineBlocks:
    """d·q + m  →  (q − zero)·scale; a block with d = 0 holds only m: codes 0, scale 1, zero −m."""
    safe = d != 0
    scale = np.where(safe, d, 1.0).astype(np.float32)
    zero = np.where(safe, -m / np.where(safe, d, 1.0), -m).astype(np.float32)
    return AffineBlocks(np.where(safe[..., None], q, 0), scale, zero, bits, False, ~safe)


def _affine_legacy(lay: LegacyLayout) -> Callable[[np.ndarray], AffineBlocks]:
    """5-bit codes are viewed as 8-bit ones (onnxruntime's MatMulNBits takes 2, 4 or 8 bits)."""
    bits = 4 if lay.nmax == 15 else 8

    def parse(b):
        q, d = lay.codes(b), f16_at(b, 0)
        if lay.m is None:
            return AffineBlocks(q, d, np.full_like(d, lay.zero), bits, True)
        return _with_min(q, d, f16_at(b, lay.m), bits)
    return parse


def _affine_lattice(lay: LatticeLayout, data: np.ndarray, shape: tuple[int, ...]) -> AffineBlocks:
    """A lattice i-quant as 8-bit codes around 128 under its sub-block scales: exact, since every
    grid value is an integer below 64 (the form onnxruntime's MatMulNBits runs)."""
    f = lay.read(data, shape)
    rows, per = shape[0], lay.scale_group // 8
    q = (f.levels() + 128).astype(np.uint8).reshape(rows, -1, lay.scale_group)
    scale = np.ascontiguousarray(f.scale[:, ::per])
    return AffineBlocks(q, scale, np.full_like(scale, 128), 8, True)


def _affine_iq4_nl(b):
    d = f16_at(b, 0)
    return AffineBlocks(nibbles(b[..., 2:18]), d, np.zeros_like(d), 4, True, values=KVALUES)


def _affine_iq4_xs(b):
    rows, n = b.shape[:2]
    h = b[..., 2:4].copy().view(np.uint16)[..., 0, None] >> (2 * np.arange(8, dtype=np.uint16))
    lo = np.stack([b[..., 4:8] & 0xF, b[..., 4:8] >> 4], axis=-1).reshape(rows, n, 8)
    ls = (lo | ((h & 3) << 4).astype(np.uint8)).astype(np.float32) - 32
    scale = (f16_at(b, 0)[..., None] * ls).reshape(rows, n * 8)
    q = nibbles(b[..., 8:136].reshape(rows, n, 8, 16)).reshape(rows, n * 8, 32)
    return AffineBlocks(q, scale, np.zeros_like(scale), 4, True, values=KVALUES)


def _codes_iq4_nl(b, q):
    b[..., 2:18] = pack_nibbles(q)


def _codes_iq4_xs(b, q):
    rows, n = b.shape[:2]
    b[..., 8:136] = pack_nibbles(q.reshape(rows, n, 8, 32)).reshape(rows, n, 128)


def _llama_cpp_encoding(fmt: QuantFormat, w: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """llama.cpp's own encoding (ggml_quantize_chunk): the second candidate of every block. Its
    library is required, and its build is part of the quantize and sensitivity cache keys
    (haloquant/environment.py): the bytes are a function of it."""
    from haloquant.llamacpp import ggml_quantize

    return ggml_quantize(fmt, w, importance)


def by_row_chunks(encode_rows: Callable[[np.ndarray], np.ndarray], w: np.ndarray,
                  threads: int | None = None) -> np.ndarray:
    """`encode_rows` over contiguous row chunks of `w` on the process's threads, rows in order.
    Every encoder here works block by block (a block never spans rows), so the bytes are the
    same for any chunking; numpy's loops and ggml's quantizer release the GIL, so the chunks run
    side by side — llama-quantize splits a tensor over its threads the same way."""
    from concurrent.futures import ThreadPoolExecutor

    from haloquant.llamacpp import default_threads

    threads = threads or default_threads()
    rows = w.shape[0]
    n = max(1, min(threads, rows // _MIN_ROWS_PER_CHUNK))
    if n == 1:
        return encode_rows(w)
    bounds = np.linspace(0, rows, n + 1).astype(int)
    with ThreadPoolExecutor(n) as pool:
        parts = list(pool.map(lambda i: encode_rows(w[bounds[i]:bounds[i + 1]]), range(n)))
    return np.concatenate([np.ascontiguousarray(p).view(np.uint8).reshape(p.shape[0], -1) for p in parts])


_MIN_ROWS_PER_CHUNK = 32  # below this a thread's start-up costs more than its rows

_T = GGMLQuantizationType
_CODE_WRITERS = {**{lay.ggml_type: lay.put_codes for lay in LAYOUTS.values()},
                 _T.IQ4_NL: _codes_iq4_nl, _T.IQ4_XS: _codes_iq4_xs}
_AFFINE_PARSERS = {**{lay.ggml_type: _affine_legacy(lay) for lay in LAYOUTS.values()},
                   _T.IQ4_NL: _affine_iq4_nl, _T.IQ4_XS: _affine_iq4_xs}
FORMATS: dict[str, QuantFormat] = {
    f.name: f
    for f in (
        QuantFormat("Q2_K", _T.Q2_K, lambda w, imp, dev=None: encode_kquant("Q2_K", w, imp, dev)),
        QuantFormat("Q3_K", _T.Q3_K, lambda w, imp, dev=None: encode_kquant("Q3_K", w, imp, dev)),
        QuantFormat("Q4_K", _T.Q4_K, lambda w, imp, dev=None: encode_kquant("Q4_K", w, imp, dev)),
        QuantFormat("Q5_K", _T.Q5_K, lambda w, imp, dev=None: encode_kquant("Q5_K", w, imp, dev)),
        QuantFormat("Q6_K", _T.Q6_K, lambda w, imp, dev=None: encode_kquant("Q6_K", w, imp, dev)),
        QuantFormat("IQ4_NL", _T.IQ4_NL, lambda w, imp, dev=None: encode_iq4("IQ4_NL", w, imp, dev),
                    llama_cpp_candidate=False),
        QuantFormat("IQ4_XS", _T.IQ4_XS, lambda w, imp, dev=None: encode_iq4("IQ4_XS", w, imp, dev)),
        *(QuantFormat(name, lay.ggml_type, lambda w, imp, dev=None, name=name: encode_lattice(name, w, imp),
                      llama_cpp_candidate=False) for name, lay in LATTICES.items()),
        QuantFormat("Q4_0", _T.Q4_0, LEGACY_ENCODERS["Q4_0"]),
        QuantFormat("Q4_1", _T.Q4_1, LEGACY_ENCODERS["Q4_1"]),
        QuantFormat("Q5_0", _T.Q5_0, LEGACY_ENCODERS["Q5_0"]),
        QuantFormat("Q5_1", _T.Q5_1, LEGACY_ENCODERS["Q5_1"]),
        QuantFormat("Q8_0", _T.Q8_0, LEGACY_ENCODERS["Q8_0"], llama_cpp_candidate=False),
        QuantFormat("F16", _T.F16),
        QuantFormat("F32", _T.F32),
    )
}


def get_format(name: str) -> QuantFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise HaloquantError(f"unknown format {name!r}; known formats: {', '.join(FORMATS)}") from None
