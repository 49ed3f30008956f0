"""llama.cpp's quantization presets as type maps, so haloquant can reproduce and compare them."""

from __future__ import annotations

from pathlib import Path

from gguf import GGUFReader

from haloquant.llamacpp import llama_quantize_preset
from haloquant.modelio import TensorInfo
from schemas.artifacts import AllocationResult, TensorChoice


def allocation_from_type_map(infos: list[TensorInfo], type_map: dict[str, str], solver: str) -> AllocationResult:
    """An allocation artifact that assigns each tensor the type `type_map` gives its GGUF name."""
    choices = [TensorChoice(name=t.name, gguf_name=t.gguf_name, format=type_map[t.gguf_name], bytes=0,
                            bits_per_weight=0, error=0) for t in infos]
    return AllocationResult(solver=solver, budget_bytes=0, budget_spec={}, used_bytes=0, total_bytes=0,
                            bits_per_weight=0, objective=0, min_feasible_bits_per_weight=0, tensors=choices, seconds=0)


def preset_type_map(f16_gguf: Path, preset: str, out: Path) -> dict[str, str]:
    """llama-quantize's per-tensor types for `preset` (it writes `out`, the preset's own file)."""
    llama_quantize_preset(f16_gguf, out, preset)
    return {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}


def tensor_data_bytes(gguf_path: Path) -> int:
    return sum(int(t.n_bytes) for t in GGUFReader(gguf_path).tensors)
