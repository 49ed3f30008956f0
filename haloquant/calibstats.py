"""Read access to the calibrate stage's statistics, per quantizable tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from haloquant.artifacts import read_artifact
from haloquant.modelio import TensorInfo
from haloquant.schemas.artifacts import CalibrationReport


class CalibrationStats:
    def __init__(self, calib_dir: Path, input_scales: dict[str, torch.Tensor] | None = None):
        self.report = read_artifact(Path(calib_dir) / "calibration.json", CalibrationReport)
        self._tensors = load_file(str(Path(calib_dir) / self.report.stats_file))
        # after Scale-Fold, module m's input is x / s: its E[xxᵀ] becomes E[xxᵀ] / (s sᵀ)
        self._input_scales = input_scales or {}

    def tensor(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def _key(self, t: TensorInfo) -> str:
        """The linear whose input multiplies this weight; embeddings are judged as the output head."""
        module = self.report.output_head if t.kind in ("token_embd", "output") else t.module
        return self.report.input_of[module]

    def gram(self, t: TensorInfo) -> torch.Tensor:
        """E[x xᵀ] of the tensor's input (for a tied embedding: of the output head's input)."""
        g = self._tensors[f"{self._key(t)}.gram"]
        s = self._input_scales.get(t.module)
        return g if s is None else g / (s[:, None] * s[None, :]).to(g.dtype)

    def importance(self, t: TensorInfo) -> np.ndarray:
        """Per-input-column E[x²]: what llama.cpp's imatrix holds, for importance-weighted fits."""
        return torch.diagonal(self.gram(t)).clamp_min(0).numpy().astype(np.float32)

    def max_abs(self, t: TensorInfo) -> torch.Tensor:
        return self._tensors[f"{self._key(t)}.max_abs"]

    def token_freq(self) -> torch.Tensor:
        c = self._tensors["token_counts"].float()
        return c / c.sum()
