"""The quantized-model artifact: llama.cpp block bytes per tensor plus the float tensors.

Validation and both exporters read this one artifact, so the torch numbers, the GGUF and the
ONNX model all hold the same weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from haloquant.artifacts import read_artifact
from haloquant.formats import get_format
from haloquant.modelio import load_model
from haloquant.schemas.artifacts import QuantizedManifest

MANIFEST_FILE = "quantized.json"
TENSORS_FILE = "tensors.safetensors"


def read_quantized(quant_dir: Path) -> tuple[QuantizedManifest, dict[str, np.ndarray]]:
    manifest = read_artifact(Path(quant_dir) / MANIFEST_FILE, QuantizedManifest)
    return manifest, load_file(str(Path(quant_dir) / manifest.tensors_file))


def dequantized_state(manifest: QuantizedManifest, tensors: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """HF parameter name → float32 tensor, exactly as the runtime decodes it."""
    state = {q.name: torch.from_numpy(get_format(q.format).decode(tensors[q.name], q.shape))
             for q in manifest.quantized}
    state.update({n: torch.from_numpy(tensors[n].copy()) for n in manifest.float_tensors})
    return state


@torch.no_grad()
def load_quantized_model(model_path: Path, quant_dir: Path, device: str = "auto"):
    """The float model with every weight replaced by its decoded quantized value."""
    model = load_model(model_path, device)
    manifest, tensors = read_quantized(quant_dir)
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, value in dequantized_state(manifest, tensors).items():
        params[name].copy_(value.to(params[name].device))
    return model
