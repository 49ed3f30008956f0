"""export_onnx: the quantized model for onnxruntime, integer weights per layer where it can."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from haloquant.artifacts import atomic_dir, sha256_file, write_json
from haloquant.modelio import check_model_dir
from haloquant.onnx_writer import export_onnx_model
from haloquant.quantized import load_quantized_model, read_quantized
from haloquant.schemas.artifacts import ExportReport
from haloquant.schemas.params import ModelSpec, ONNXSpec

ONNX_FILE = "model.onnx"


def export_onnx(model_spec: ModelSpec, spec: ONNXSpec, quant_dir: Path, out_dir: Path) -> ExportReport:
    model_dir = check_model_dir(model_spec.path)
    model = load_quantized_model(model_dir, quant_dir, "cpu")
    manifest, tensors = read_quantized(quant_dir)
    with atomic_dir(out_dir) as tmp:  # the folder is the artifact: never half old, half new
        stored, weight_bytes = export_onnx_model(model, model_dir, manifest, tensors, tmp, spec.opset,
                                                     spec.accuracy_level)
        path = tmp / ONNX_FILE
        report = ExportReport(format="onnx", file=ONNX_FILE, bytes=path.stat().st_size, sha256=sha256_file(path),
                              tensor_types=dict(Counter(stored.values())))
        write_json(tmp / "export.json", {**report.model_dump(), "weight_bytes": weight_bytes, "linears": stored})
    return report
