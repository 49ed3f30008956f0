"""sweep: the size-vs-perplexity Pareto front.

`sweep_point` runs allocate → scale_fold → quantize → export_gguf at one budget (reusing the main
pipeline's calibration and sensitivity: they do not depend on the budget) and scores the GGUF with
llama.cpp. `preset_point` does the same for a llama.cpp preset: llama.cpp's own type map and
quantizer, with the calibration imatrix. tasks/pareto.py gathers the points into one DVC plot.
"""

from __future__ import annotations

from pathlib import Path

from haloquant.artifacts import read_artifact, write_json
from haloquant.llamacpp import llama_cpp_perplexity
from haloquant.modelio import model_skeleton, quantizable_tensors
from haloquant.presets import allocation_from_type_map, preset_type_map
from haloquant.textdata import read_text
from haloquant.schemas.artifacts import QuantizedManifest, SweepPoint
from haloquant.schemas.params import Budget, Params, QuantizeSpec
from haloquant.tasks.allocate import allocate
from haloquant.tasks.pareto import POINT_FILE
from haloquant.tasks.export_gguf import export_gguf
from haloquant.tasks.quantize import quantize
from haloquant.tasks.scale_fold import scale_fold



def _score(p: Params, out: Path, series: str, label: str) -> SweepPoint:
    gguf = out / "export_gguf" / "model.gguf"
    lc = llama_cpp_perplexity(gguf, read_text(p.validate_.text, "validate.text"), p.validate_.ctx, p.sweep.max_chunks)
    manifest = read_artifact(out / "quantize" / "quantized.json", QuantizedManifest)
    point = SweepPoint(series=series, label=label, bits_per_weight=manifest.bits_per_weight,
                       gguf_bytes=gguf.stat().st_size, ppl=lc["ppl"], n_chunks=lc["n_chunks"])
    write_json(out / POINT_FILE, point.model_dump())
    return point


def sweep_point(p: Params, bits_per_weight: float, root: Path, out: Path) -> SweepPoint:
    spec = p.allocation.model_copy(update={"budget": Budget(bits_per_weight=bits_per_weight)})
    allocate(spec, root / "sensitivity", out / "allocate", p.model, p.quantize, root / "calibrate")
    scale_fold(p.model, p.fold, root / "calibrate", out / "allocate", out / "scale_fold")
    quantize(p.model, p.quantize, root / "calibrate", out / "allocate", out / "scale_fold", out / "quantize")
    export_gguf(p.model, p.export.gguf, out / "quantize", out / "export_gguf")
    return _score(p, out, "haloquant", f"{bits_per_weight:g} bpw")


# what llama-quantize --imatrix does, and nothing of haloquant's own: no statistics corrections
LLAMA_QUANTIZE = QuantizeSpec(method="llamacpp", importance=True, correct_row_scales=False, correct_input_scales=False)


def preset_point(p: Params, preset: str, root: Path, out: Path) -> SweepPoint:
    infos = quantizable_tensors(model_skeleton(p.model.path))
    f16 = out / "f16"  # llama-quantize needs a float GGUF to start from
    write_json(f16 / "allocate" / "allocation.json",
               allocation_from_type_map(infos, {t.gguf_name: "F16" for t in infos}, "F16").model_dump())
    scale_fold(p.model, p.fold.model_copy(update={"method": "identity"}), root / "calibrate", f16 / "allocate",
               f16 / "scale_fold")
    quantize(p.model, LLAMA_QUANTIZE.model_copy(update={"method": "rtn"}), root / "calibrate", f16 / "allocate",
             f16 / "scale_fold", f16 / "quantize")
    export_gguf(p.model, p.export.gguf, f16 / "quantize", f16 / "export_gguf")
    type_map = preset_type_map(f16 / "export_gguf" / "model.gguf", preset, f16 / "llama.cpp.gguf")
    write_json(out / "allocate" / "allocation.json", allocation_from_type_map(infos, type_map, preset).model_dump())
    quantize(p.model, LLAMA_QUANTIZE, root / "calibrate", out / "allocate",
             f16 / "scale_fold", out / "quantize")
    export_gguf(p.model, p.export.gguf, out / "quantize", out / "export_gguf")
    return _score(p, out, "llama.cpp+imatrix", preset)
