"""Read access to the calibrate stage's statistics, per quantizable tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from haloquant import HaloquantError
from haloquant.artifacts import read_artifact
from haloquant.layergrams import LayerGrams
from haloquant.modelio import TensorInfo
from haloquant.schemas.artifacts import CalibrationReport


class CalibrationStats:
    def __init__(self, calib_dir: Path, input_scales: dict[str, torch.Tensor] | None = None, model=None,
                 device: torch.device | None = None):
        """`model`: the float model the statistics were taken of (after Scale-Fold: the folded one),
        needed for the decoder blocks' Gram matrices, which are rebuilt a block at a time
        (haloquant/layergrams.py; ask in model order); `device`: where those blocks run."""
        self.report = read_artifact(Path(calib_dir) / "calibration.json", CalibrationReport)
        self._tensors = load_file(str(Path(calib_dir) / self.report.stats_file))
        # after Scale-Fold, module m's input is x / s: its E[xxᵀ] becomes E[xxᵀ] / (s sᵀ)
        self._input_scales = input_scales or {}
        self._blocks = (LayerGrams(model, self._tensors["calibration_ids"], self.report.input_of, device)
                        if model is not None else None)

    def tensor(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def _key(self, t: TensorInfo) -> str:
        """The linear whose input multiplies this weight; embeddings are judged as the output head."""
        module = self.report.output_head if t.kind in ("token_embd", "output") else t.module
        return self.report.input_of[module]

    def _scales(self, t: TensorInfo) -> torch.Tensor | None:
        return self._input_scales.get(t.module)

    def gram(self, t: TensorInfo) -> torch.Tensor:
        """E[x xᵀ] of the tensor's input (for a tied embedding: of the output head's input); a decoder
        block's is on the device its blocks run on, the stored ones on the CPU."""
        key = self._key(t)
        if f"{key}.gram" in self._tensors:
            g, s = self._tensors[f"{key}.gram"], self._scales(t)
            return g if s is None else g / (s[:, None] * s[None, :]).to(g.dtype)
        return self.gram_of(key)

    def gram_of(self, key: str) -> torch.Tensor:
        """E[x xᵀ] of the input `key` names (a key of the report's input_of)."""
        if f"{key}.gram" in self._tensors:
            return self._tensors[f"{key}.gram"]
        if self._blocks is None:
            raise HaloquantError(f"the Gram matrix of {key}'s input is rebuilt from the model: pass the model to "
                                 "CalibrationStats")
        # the blocks run on the model as given: after Scale-Fold its inputs are already x / s
        return self._blocks.gram(key)

    def importance(self, t: TensorInfo) -> np.ndarray:
        """Per-input-column E[x²]: what llama.cpp's imatrix holds, for importance-weighted fits."""
        e = self._tensors[f"{self._key(t)}.sq_mean"]
        s = self._scales(t)
        e = e if s is None else e / s.pow(2).to(e.dtype)
        return e.clamp_min(0).numpy().astype(np.float32)

    def max_abs(self, t: TensorInfo) -> torch.Tensor:
        return self._tensors[f"{self._key(t)}.max_abs"]

    def token_freq(self) -> torch.Tensor:
        c = self._tensors["token_counts"].float()
        return c / c.sum()
