"""export_onnx: the quantized model for onnxruntime, integer weights per layer where it can."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from haloquant.artifacts import sha256_file, write_json
from haloquant.modelio import check_model_dir
from haloquant.onnx_writer import export_onnx_model
from haloquant.quantized import load_quantized_model, read_quantized
from schemas.artifacts import ExportReport
from schemas.params import ModelSpec, ONNXSpec

ONNX_FILE = "model.onnx"


def export_onnx(model_spec: ModelSpec, spec: ONNXSpec, quant_dir: Path, out_dir: Path) -> ExportReport:
    t0 = time.perf_counter()
    model_dir = check_model_dir(model_spec.path)
    model = load_quantized_model(model_dir, quant_dir, "cpu")
    manifest, tensors = read_quantized(quant_dir)
    stored = export_onnx_model(model, model_dir, manifest, tensors, out_dir, spec.opset)
    path = out_dir / ONNX_FILE
    report = ExportReport(format="onnx", file=ONNX_FILE, bytes=path.stat().st_size, sha256=sha256_file(path),
                          tensor_types=dict(Counter(stored.values())),
                          seconds=time.perf_counter() - t0)
    write_json(out_dir / "export.json", {**report.model_dump(), "linears": stored})
    return report
