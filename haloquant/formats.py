"""Weight storage formats: one interface for every llama.cpp tensor type haloquant writes.

A `QuantFormat` knows its real storage cost (scales and mins included), its block shape, and how
to encode a float matrix into llama.cpp's exact block bytes and decode them back. The allocation's
candidate set is just a list of format names; the bytes the quantize stage stores are the bytes
the GGUF holds, so what validation measures is what llama.cpp runs.

Each type's encoder, byte layout and code grid live in its codec module, which registers it in
`haloquant.codec.CODECS`: the k-quants in `haloquant.kquants`, IQ4_NL / IQ4_XS in
`haloquant.iquants`, the lattice i-quants (IQ1_S … IQ3_S) in `haloquant.latticequants`, the
legacy block-32 types (Q4_0 … Q8_0) in `haloquant.legacyquants`; this module adds what is common
to all of them. Decoding goes through `gguf.quants.dequantize`, the reference decoder, or its
torch port (`haloquant.decoders`: the same values bit for bit, on the CPU or a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq

from haloquant import HaloquantError, iquants, kquants, latticequants, legacyquants  # noqa: F401 (they register)
from haloquant.arrays import row_chunks, sum_last
from haloquant.codec import CODECS, AffineBlocks, Codec
from haloquant.decoders import decode_torch
from haloquant.latticequants import LATTICES, LatticeLayout


@dataclass(frozen=True)
class QuantFormat:
    """A llama.cpp tensor type, seen as a codec for 2-D weight matrices (rows × cols)."""

    name: str
    ggml_type: GGMLQuantizationType
    codec: Codec | None = None  # None: F16, F32
    # also try llama.cpp's quantizer block by block and keep the better block (the codec's default;
    # `own_fit_only` turns it off, e.g. for sensitivity.llama_cpp_candidate: false)
    llama_cpp_candidate: bool = True

    @property
    def encoder(self) -> Callable[..., np.ndarray] | None:
        """(weight, importance, device) → block bytes: haloquant's own fit (None for the floats)."""
        return None if self.codec is None else self.codec.encode

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
        elif device is not None:
            out = on_device_by_rows(lambda rows: self._own_rows(rows, importance, device), w)
        else:
            out = by_row_chunks(lambda rows: self._encode_rows(rows, importance), w, threads)
        return np.ascontiguousarray(out).view(np.uint8).reshape(w.shape[0], -1)

    def _encode_on_device(self, w: np.ndarray, importance: np.ndarray | None, threads: int | None,
                          device) -> np.ndarray:
        """The own fit on the device (row chunk by row chunk: haloquant.arrays.row_chunks) while
        llama.cpp's blocks are made on the CPU's threads beside it (ggml releases the GIL), then the
        choice block by block on the device: the same bytes as the CPU path, at the cost of the
        slower of the two."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            theirs = pool.submit(by_row_chunks, lambda rows: _llama_cpp_encoding(self, rows, importance), w, threads)
            own = on_device_by_rows(lambda rows: self._own_rows(rows, importance, device), w)
            theirs = theirs.result()
            return np.concatenate([self.best_blocks(w[r], importance, own[r], theirs[r], device=device)
                                   for r in row_chunks(*w.shape)])

    def own_fit_only(self) -> "QuantFormat":
        """This format without llama.cpp's per-block candidate (same bytes layout and decoder)."""
        return self if not self.llama_cpp_candidate else replace(self, llama_cpp_candidate=False)

    def encode_own(self, weight: np.ndarray, importance: np.ndarray | None = None,
                   threads: int | None = None, device=None) -> np.ndarray:
        """haloquant's own fit alone, without llama.cpp's blocks (bench/llama_cpp_candidate.py
        measures what the comparison adds)."""
        w = np.ascontiguousarray(weight, dtype=np.float32)
        if device is not None:
            return on_device_by_rows(lambda rows: self._own_rows(rows, importance, device), w)
        return by_row_chunks(lambda rows: self._own_rows(rows, importance), w, threads)

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

    def affine_blocks(self, data: np.ndarray, shape: tuple[int, ...]) -> AffineBlocks | None:
        """The format's bytes as integer codes with a scale and zero point per group, such that
        (q − zero) · scale = decode(data) — (values[q] − zero) · scale for the IQ4 types, whose
        codes index a fixed table; for the lattice i-quants 8-bit codes 128 + the signed grid value
        (an integer) per weight; None where the format is not of that form (floats)."""
        if self.codec is None or self.codec.affine is None:
            return None
        return self.codec.affine(np.ascontiguousarray(data, dtype=np.uint8).reshape(shape[0], -1, self.type_size))

    @property
    def code_values(self) -> np.ndarray | None:
        """The table a code indexes (IQ4_NL, IQ4_XS); None where code q stands for q itself."""
        return None if self.codec is None else self.codec.code_values

    @property
    def max_code(self) -> int:
        """Largest integer code of the format's affine view."""
        if self.codec is None or self.codec.max_code is None:
            raise HaloquantError(f"format {self.name} has no integer codes to round to")
        return self.codec.max_code

    def with_codes(self, data: np.ndarray, shape: tuple[int, ...], q: np.ndarray) -> np.ndarray:
        """Block bytes with every code replaced by `q` (rows, groups, group size), scales kept —
        how GPTQ writes its own rounding into the grid it fixed."""
        if self.codec is None or self.codec.write_codes is None:
            raise HaloquantError(f"format {self.name} has no integer codes to write")
        blocks = np.array(data, dtype=np.uint8).reshape(shape[0], -1, self.type_size)
        self.codec.write_codes(blocks, np.asarray(q, dtype=np.uint8).reshape(blocks.shape[0], blocks.shape[1], -1))
        return blocks.reshape(shape[0], -1)

    def roundtrip(self, weight: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
        """decode(encode(weight)): the weight as the runtime will see it."""
        return self.decode(self.encode(weight, importance), weight.shape)


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


def on_device_by_rows(encode_rows: Callable[[np.ndarray], np.ndarray], w: np.ndarray) -> np.ndarray:
    """`encode_rows` over `w`'s row chunks (haloquant.arrays.row_chunks) one after another: a device
    encoder's float intermediates are bounded by the chunk, not the tensor; the bytes are the same
    for any chunking (blocks never span rows)."""
    parts = [np.ascontiguousarray(encode_rows(w[r])).view(np.uint8).reshape(r.stop - r.start, -1)
             for r in row_chunks(*w.shape)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


_MIN_ROWS_PER_CHUNK = 32  # below this a thread's start-up costs more than its rows

# every registered type, in order of bits per weight (then name), and the floats
FORMATS: dict[str, QuantFormat] = {
    f.name: f
    for f in sorted((QuantFormat(name, c.ggml_type, c, c.llama_cpp_candidate) for name, c in CODECS.items()),
                    key=lambda f: (f.bits_per_weight, f.name))
    + [QuantFormat("F16", GGMLQuantizationType.F16), QuantFormat("F32", GGMLQuantizationType.F32)]
}


def get_format(name: str) -> QuantFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise HaloquantError(f"unknown format {name!r}; known formats: {', '.join(FORMATS)}") from None
