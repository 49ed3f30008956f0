"""The quantized artifact as a GGUF file, through llama.cpp's own converter (haloquant/converter.py):
metadata, tokenizer, chat template, names and per-family transforms from the converter; the
tensors' bytes from the quantize stage, untouched (a row gather where the converter permutes or
slices rows — rows are independent blocks in every format, so that is exact)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import gguf
import numpy as np

from haloquant.artifacts import atomic_path
from haloquant.converter import EncodedTensor, GGUFPlan, header_bytes, write_gguf as converter_write
from haloquant.formats import get_format
from haloquant.modelio import load_tokenizer
from haloquant.textdata import sequence_bos
from haloquant.schemas.artifacts import QuantizedManifest


def file_type(formats: Counter) -> gguf.LlamaFileType:
    """general.file_type from the most common format (llama.cpp shows it; nothing depends on it)."""
    main = formats.most_common(1)[0][0]
    for name in (f"MOSTLY_{main}", f"MOSTLY_{main}_M", "ALL_F32" if main == "F32" else ""):
        if hasattr(gguf.LlamaFileType, name):
            return getattr(gguf.LlamaFileType, name)
    return gguf.LlamaFileType.GUESSED


def gguf_add_bos(model_spec) -> bool:
    """tokenizer.ggml.add_bos_token, always written: model.add_bos, or what the model's own tokenizer
    does. llama.cpp's converter decides some by vocabulary size (it turns BOS off for every
    49152-token vocabulary, Granite's, which SmolLM's share), and llama.cpp must place BOS as
    torch does or the two score different texts."""
    return sequence_bos(load_tokenizer(model_spec.path), model_spec.add_bos) is not None


def encoded(manifest: QuantizedManifest, tensors: dict[str, np.ndarray]) -> dict[str, EncodedTensor]:
    return {q.name: EncodedTensor(np.asarray(tensors[q.name], np.uint8).reshape(q.shape[0], -1),
                                  get_format(q.format).ggml_type, tuple(q.shape)) for q in manifest.quantized}


def write_gguf(path: Path, model_dir: Path, manifest: QuantizedManifest, tensors: dict[str, np.ndarray],
               name: str | None, add_bos: bool | None = None) -> dict[str, int]:
    """Write the GGUF atomically; returns the count of GGUF tensors per type."""
    formats = Counter(q.format for q in manifest.quantized)
    floats = {n: tensors[n] for n in manifest.float_tensors}
    with atomic_path(path) as tmp:
        plan = converter_write(tmp, model_dir, encoded(manifest, tensors), floats, name, file_type(formats), add_bos)
    return dict(Counter(plan.types.values()))


def gguf_overhead_bytes(model_dir: Path, shapes: dict[str, tuple[int, int]], floats: dict[str, np.ndarray],
                        name: str | None, add_bos: bool | None = None) -> int:
    """Upper bound on a GGUF's size beyond haloquant's tensor data: header, metadata and tensor infos
    (exact: written by the converter for these names; independent of the types), tensors the
    converter adds (e.g. RoPE factors), and the most alignment padding the data can take (one
    alignment per tensor and one before the data), plus 64 bytes for a longer general.name."""
    stand_ins = {n: EncodedTensor(np.empty((s[0], 4 * s[1]), np.uint8), gguf.GGMLQuantizationType.F32, s)
                 for n, s in shapes.items()}
    header, plan = header_bytes(model_dir, stand_ins, {n: np.zeros(v.shape, np.float32) for n, v in floats.items()},
                                name, add_bos)
    extra = sum(b for n, b in plan.nbytes.items() if plan.sources.get(n) is None)
    return header + extra + gguf.GGUF_DEFAULT_ALIGNMENT * (len(plan.nbytes) + 1) + 64


__all__ = ["write_gguf", "gguf_overhead_bytes", "file_type", "GGUFPlan"]
