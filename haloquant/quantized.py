"""The quantized-model artifact: llama.cpp block bytes per tensor plus the float tensors.

Validation and both exporters read this one artifact, so the torch numbers, the GGUF and the
ONNX model all hold the same weights.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from haloquant.artifacts import read_artifact
from haloquant.formats import get_format
from haloquant.blocks import module_name
from haloquant.modelio import decoder_layers, load_model
from haloquant.streaming import set_source, streamed
from haloquant.schemas.artifacts import QuantizedManifest

MANIFEST_FILE = "quantized.json"
TENSORS_FILE = "tensors.safetensors"


def read_quantized(quant_dir: Path) -> tuple[QuantizedManifest, dict[str, np.ndarray]]:
    manifest = read_artifact(Path(quant_dir) / MANIFEST_FILE, QuantizedManifest)
    return manifest, load_file(str(Path(quant_dir) / manifest.tensors_file))


def dequantized_state(manifest: QuantizedManifest, tensors: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """HF parameter name → float32 tensor, exactly as the runtime decodes it."""
    state = {q.name: get_format(q.format).decode_torch(tensors[q.name], tuple(q.shape)) for q in manifest.quantized}
    state.update({n: torch.from_numpy(tensors[n].copy()) for n in manifest.float_tensors})
    return state


@torch.no_grad()
def load_quantized_model(model_path: Path, quant_dir: Path, device: str = "auto", stream: bool | str = False):
    """The float model with every weight replaced by its decoded quantized value (float32).

    Streamed (haloquant/streaming.py), a decoder block's quantized weights are decoded when the
    block is put on the device, and the checkpoint's copies of them are dropped: the host holds the
    quantized bytes, not a float model."""
    model = load_model(model_path, device, stream)
    manifest, tensors = read_quantized(quant_dir)
    params = dict(model.named_parameters(remove_duplicate=False))
    blocks = {f"{module_name(model, layer)}.": layer for layer in decoder_layers(model)} if streamed(model) else {}
    for q in manifest.quantized:
        decode = functools.partial(_decoded, get_format(q.format), tensors[q.name], tuple(q.shape))
        prefix = next((b for b in blocks if q.name.startswith(b)), None)
        if prefix is None:
            params[q.name].data = decode(params[q.name].device)
        else:
            set_source(blocks[prefix], q.name[len(prefix):], decode)
            params[q.name].data = torch.empty(0, dtype=params[q.name].dtype)
    for n in manifest.float_tensors:
        params[n].data = torch.from_numpy(tensors[n].copy()).to(params[n].device)
    return model


def _decoded(fmt, data: np.ndarray, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    return fmt.decode_torch(data, shape, device)
