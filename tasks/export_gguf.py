"""export_gguf: the quantized artifact as a GGUF file that unmodified llama.cpp loads, its metadata
written by llama.cpp's own converter (haloquant/converter.py)."""

from __future__ import annotations

from pathlib import Path

from haloquant.artifacts import sha256_file, write_json
from haloquant.converter import version as converter_version
from haloquant.gguf_writer import gguf_add_bos, write_gguf
from haloquant.modelio import check_model_dir, model_name
from haloquant.quantized import read_quantized
from haloquant.schemas.artifacts import ExportReport
from haloquant.schemas.params import GGUFSpec, ModelSpec

GGUF_FILE = "model.gguf"


def export_gguf(model_spec: ModelSpec, spec: GGUFSpec, quant_dir: Path, out_dir: Path) -> ExportReport:
    model_dir = check_model_dir(model_spec.path)
    manifest, tensors = read_quantized(quant_dir)
    path = out_dir / GGUF_FILE
    counts = write_gguf(path, model_dir, manifest, tensors, spec.name or model_name(model_dir),
                        gguf_add_bos(model_spec))
    report = ExportReport(format="gguf", file=GGUF_FILE, bytes=path.stat().st_size, sha256=sha256_file(path),
                          tensor_types=counts, writer=converter_version())
    write_json(out_dir / "export.json", report.model_dump())
    return report
