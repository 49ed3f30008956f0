"""quantize: encode every weight into the format the allocation chose (after Scale-Fold).

Method `rtn`: each format's round-to-nearest encoder; with `importance`, k-quant scales are fitted
to calibration-weighted error (llama.cpp's imatrix, from the calibrate stage's diag(XᵀX)).
Method `gptq`: GPTQ on the format's own grid with the calibration Hessian (haloquant/gptq.py), or
with `gptq.sequential` the Hessians of the quantized model's own inputs (haloquant/sequential.py).
With `block_tuning.iters` > 0 the codes of every decoder block are then tuned against the float
block's output (haloquant/reconstruct.py); scales stay, bytes stay llama.cpp's. With
`correct_input_scales` every linear group's input channels are then rescaled to the float model's
outputs through the norms and the v/up rows (haloquant/input_scales.py). With `end_to_end.iters` > 0
the whole quantized model's codes, norm weights and biases are last tuned against the float model's
next-token distributions (haloquant/end_to_end.py).
The artifact holds the exact block bytes that export_gguf writes and validate decodes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from haloquant import HaloquantError
from haloquant.artifacts import atomic_path, read_artifact, write_json
from haloquant.calibstats import CalibrationStats
from haloquant.end_to_end import EndToEndSettings, tune_end_to_end
from haloquant.folding import load_folds
from haloquant.formats import get_format
from haloquant.input_scales import correct_input_scales
from haloquant.modelio import float_tensors, load_model, model_name, quantizable_tensors
from haloquant.progress import track
from haloquant.quantizer import quantize_tensor, uses_gptq
from haloquant.quantized import MANIFEST_FILE, TENSORS_FILE
from haloquant.reconstruct import TuneSettings, tune_blocks
from haloquant.sequential import quantize_sequentially
from haloquant.streaming import compute_device, streamed
from haloquant.schemas.artifacts import AllocationResult, QuantizedManifest, QuantizedTensor
from haloquant.schemas.params import ModelSpec, QuantizeSpec
from haloquant.widening import source_weight_ratio

log = logging.getLogger(__name__)


def quantize(model_spec: ModelSpec, spec: QuantizeSpec, calib_dir: Path, allocation_dir: Path, fold_dir: Path,
             out_dir: Path) -> QuantizedManifest:
    allocation = read_artifact(allocation_dir / "allocation.json", AllocationResult)
    model = load_model(model_spec.path, model_spec.device, model_spec.stream)
    if spec.end_to_end.iters and streamed(model):  # before hours of encoding, not after
        raise HaloquantError("quantize.end_to_end.iters: end-to-end tuning needs the whole model on one device, and "
                             f"model.stream: {model_spec.stream} streams this one; set end_to_end.iters to 0")
    input_scales = load_folds(model, fold_dir)
    device = compute_device(model)
    stats = CalibrationStats(calib_dir, input_scales=input_scales, model=model, device=device)
    params = dict(model.named_parameters(remove_duplicate=False))
    chosen = {c.name: c.format for c in allocation.tensors}
    infos = quantizable_tensors(model)
    missing = [t.name for t in infos if t.name not in chosen]
    if missing:
        raise HaloquantError(f"{allocation_dir / 'allocation.json'} has no format for {missing[:3]}: it was made for "
                             "another model; re-run allocate")

    arrays: dict[str, np.ndarray] = {}
    quantized = []
    formats = {t.name: get_format(chosen[t.name]) for t in infos}
    in_blocks = [t for t in infos if t.layer >= 0 and uses_gptq(t, formats[t.name], spec)]
    # block tuning starts from the weights GPTQ rounded
    rounded = {t.name: np.empty(t.shape, np.float32) for t in in_blocks} if spec.block_tuning.iters else {}

    def encode(t, gram=None):
        return quantize_tensor(t, params[t.name], formats[t.name], spec, stats, device, rounded.get(t.name), gram)

    if spec.method == "gptq" and spec.gptq.sequential:  # decoder blocks in order, Hessians from the quantized path
        arrays = quantize_sequentially(model, stats.tensor("calibration_ids"), in_blocks, formats,
                                       stats.report.input_of, encode)
    for t in track(infos, "quantize", "tensors"):
        if t.name not in arrays:
            started = time.perf_counter()
            arrays[t.name] = encode(t)
            log.debug("quantize: %s (block %d) %.2f s", t.name, t.layer, time.perf_counter() - started)
        quantized.append(QuantizedTensor(name=t.name, gguf_name=t.gguf_name, format=formats[t.name].name,
                                         shape=t.shape, bytes=int(arrays[t.name].nbytes)))
    if spec.block_tuning.iters:
        arrays, _ = tune_blocks(model, stats.tensor("calibration_ids"), arrays, formats,
                                TuneSettings(**spec.block_tuning.model_dump()), device, rounded)
    corrected = {}
    if spec.correct_input_scales:
        arrays, corrected, _ = correct_input_scales(model, stats.tensor("calibration_ids"), arrays, formats, device,
                                                    log=log.debug)
    if spec.end_to_end.iters:
        arrays, corrected, _ = tune_end_to_end(model, stats.tensor("calibration_ids"), arrays, formats, corrected,
                                               EndToEndSettings(**spec.end_to_end.model_dump()), device,
                                               log=log.info)
    floats = {**float_tensors(model), **corrected}
    arrays.update({n: v.float().numpy() for n, v in floats.items()})
    with atomic_path(out_dir / TENSORS_FILE) as tmp:
        save_file(arrays, str(tmp))
    n_weights = sum(t.n_weights for t in infos)
    qbytes = sum(q.bytes for q in quantized)
    manifest = QuantizedManifest(
        method=spec.method, model=model_name(model_spec.path), tensors_file=TENSORS_FILE, quantized=quantized,
        float_tensors=sorted(floats), total_bytes=qbytes + sum(v.numel() * 4 for v in floats.values()),
        n_weights=n_weights, bits_per_weight=8 * qbytes / (n_weights * source_weight_ratio(model_spec.path)),
    )
    write_json(out_dir / MANIFEST_FILE, manifest.model_dump())
    return manifest
