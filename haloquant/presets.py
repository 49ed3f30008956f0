"""llama.cpp's quantization presets as type maps, so haloquant can reproduce and compare them."""

from __future__ import annotations

import re
from pathlib import Path

from gguf import GGUFReader

from haloquant import HaloquantError
from haloquant.llamacpp import llama_quantize_preset
from haloquant.modelio import TensorInfo
from haloquant.schemas.artifacts import AllocationResult, TensorChoice


def allocation_from_type_map(infos: list[TensorInfo], type_map: dict[str, str], solver: str) -> AllocationResult:
    """An allocation artifact that assigns each tensor the type `type_map` gives its GGUF name."""
    from haloquant.formats import get_format

    choices = []
    for t in infos:
        f = type_map[t.gguf_name]
        nbytes = get_format(f).storage_bytes(t.shape)
        choices.append(TensorChoice(name=t.name, gguf_name=t.gguf_name, format=f, bytes=nbytes,
                                    bits_per_weight=8 * nbytes / t.n_weights, error=0))
    used = sum(c.bytes for c in choices)
    return AllocationResult(solver=solver, budget_bytes=used, budget_spec={}, used_bytes=used, total_bytes=used,
                            bits_per_weight=8 * used / sum(t.n_weights for t in infos), objective=0,
                            min_feasible_bits_per_weight=0, tensors=choices)


def preset_type_map(f16_gguf: Path, preset: str, out: Path) -> dict[str, str]:
    """llama-quantize's per-tensor types for `preset` (it writes `out`, the preset's own file)."""
    llama_quantize_preset(f16_gguf, out, preset)
    return {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}


_DRY_RUN_LINE = re.compile(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\w+), size =\s*[\d.]+ MiB"
                           r"(?: ->\s*[\d.]+ MiB \((\w+)\))?")


def preset_type_map_dry(f16_gguf: Path, preset: str) -> dict[str, str]:
    """llama-quantize's per-tensor types for `preset` without quantizing (its dry run, read from
    llama.cpp's log): also for the presets it refuses to quantize without an imatrix (IQ2_M, IQ2_XXS …)."""
    import ctypes
    import tempfile

    import llama_cpp as lc
    from llama_cpp import _logger

    lines: list[str] = []
    collect = lc.llama_log_callback(lambda level, text, user: lines.append(text.decode("utf-8", "replace")))
    lc.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            llama_quantize_preset(f16_gguf, Path(tmp) / "dry.gguf", preset, dry_run=True)
    finally:
        lc.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    found = {m[1]: (m[3] or m[2]).upper() for m in _DRY_RUN_LINE.finditer("".join(lines))}
    if not found:
        raise HaloquantError(f"llama.cpp's dry run of preset {preset} on {f16_gguf} gave no type map")
    return found


def tensor_data_bytes(gguf_path: Path) -> int:
    return sum(int(t.n_bytes) for t in GGUFReader(gguf_path).tensors)
