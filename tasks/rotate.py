"""rotate: the model the later stages quantize — the checkpoint itself, or a copy of it that computes
the same logits: widened to whole 256-blocks (rotate.widen, haloquant/widening.py), rotated
(rotate.enabled, haloquant/rotation.py), or both, widened first.

`rotate.widen: auto` widens exactly when the allocation budget cannot be met at the checkpoint's widths
(the smallest allocation of sensitivity.formats, their block-32 fallbacks and allocation.rules is larger)
and can be met widened: widening costs D/d of every stream-reading matrix, so where the budget is
feasible unwidened the checkpoint does better (bench/results/widening_real_models_2026-12-07.md).

The copy goes to its own folder (left empty when there is none, so the stage's outputs are the same two
paths either way); the record names the copy's files with their hashes, so the stages after it depend
on that small file rather than hashing a model-sized folder again each time. Whether the later stages
read the copy is the record's to say (`copies_model`), so the decision is made once, here.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from haloquant import HaloquantError
from haloquant.artifacts import read_artifact, sha256_file, write_json
from haloquant.budget import fits, sizes_table
from haloquant.families import family_of_architecture
from haloquant.gguf_writer import gguf_add_bos, gguf_overhead_bytes
from haloquant.kquants import QK_K  # the k-quant and i-quant block: rows of whole blocks take every format
from haloquant.modelio import check_model_dir, model_name, model_skeleton, quantizable_tensors, read_config
from haloquant.rotation import check_rotatable, write_rotated
from haloquant.schemas.artifacts import RotationRecord
from haloquant.schemas.params import AllocationSpec, ModelSpec, RotateSpec, SensitivitySpec
from haloquant.widening import check_widenable, widened_skeleton, widened_width, write_widened

log = logging.getLogger(__name__)


def widening_needed(model_spec: ModelSpec, sensitivity: SensitivitySpec, allocation: AllocationSpec) -> bool:
    """rotate.widen auto: the budget is infeasible at the checkpoint's widths and feasible widened."""
    checkpoint = model_skeleton(model_spec.path)
    infos = quantizable_tensors(checkpoint)
    weights = sum(t.n_weights for t in infos)
    overhead = 0
    if allocation.budget.field in ("file_bytes", "file_mb"):  # the same metadata either way (an upper bound)
        shapes = {t.gguf_name: t.shape for t in infos}
        floats = {n: np.zeros(p.shape, np.float32) for n, p in checkpoint.named_parameters() if p.ndim != 2}
        overhead = gguf_overhead_bytes(Path(model_spec.path), shapes, floats, model_name(model_spec.path),
                                       gguf_add_bos(model_spec))
    ok, bpw = fits(sizes_table(checkpoint, sensitivity, weights, overhead), allocation)
    if ok:
        return False
    ok_wide, bpw_wide = fits(sizes_table(widened_skeleton(model_spec.path, QK_K), sensitivity, weights, overhead),
                             allocation)
    log.info("rotate.widen auto: the smallest allocation needs %.3f bits per weight at the checkpoint's widths, "
             "%.3f widened: %s", bpw, bpw_wide, "widening" if ok_wide else "not widening (infeasible either way)")
    return ok_wide


def stream_is_whole(model_spec: ModelSpec) -> bool:
    """Whether the checkpoint's hidden width is whole 256-blocks already (nothing to widen)."""
    hidden = read_config(model_spec.path).get("hidden_size")
    return not isinstance(hidden, int) or widened_width(hidden, QK_K) == hidden


def widens(model_spec: ModelSpec, spec: RotateSpec, sensitivity: SensitivitySpec, allocation: AllocationSpec) -> bool:
    """Whether the rotate stage widens this checkpoint: its hidden width is not whole 256-blocks, and
    rotate.widen is true, or auto and the budget needs it (a family that cannot be widened: never)."""
    if spec.widen is False or stream_is_whole(model_spec):
        return False
    if spec.widen is True:
        return True
    arch = (read_config(model_spec.path).get("architectures") or [None])[0]
    return family_of_architecture(arch).widenable and widening_needed(model_spec, sensitivity, allocation)


def copies_model(record_file: Path) -> bool:
    """Whether the stages after `rotate` quantize its copy (artifacts/rotate/model) rather than model.path:
    the rotate stage's record says."""
    if not Path(record_file).is_file():
        raise HaloquantError(f"{record_file}: missing — the rotate stage has not run (dvc repro rotate)")
    record = read_artifact(record_file, RotationRecord)
    return record.enabled or record.widened is not None


def rotate(model_spec: ModelSpec, spec: RotateSpec, sensitivity: SensitivitySpec, allocation: AllocationSpec,
           record_file: Path, model_dir: Path) -> RotationRecord:
    src = check_model_dir(model_spec.path)  # what cannot be widened or rotated is refused in preflight
    shutil.rmtree(model_dir, ignore_errors=True)
    widen = widens(model_spec, spec, sensitivity, allocation)
    if not (spec.enabled or widen):
        model_dir.mkdir(parents=True)
        record = RotationRecord(enabled=False, model=src.name)
    else:
        widened, source = None, src
        if widen:
            source = model_dir.with_name(model_dir.name + ".widened") if spec.enabled else model_dir
            widened = write_widened(src, source, QK_K)["hidden"]
        untied = None
        if spec.enabled:
            untied = write_rotated(source, model_dir, spec.seed, spec.heads)["untied_head"]
            if source != src:
                shutil.rmtree(source)
        files = {f.name: sha256_file(f) for f in sorted(model_dir.iterdir()) if f.is_file()}
        record = RotationRecord(enabled=spec.enabled, model=src.name, seed=spec.seed if spec.enabled else None,
                                heads=spec.heads if spec.enabled else None, untied_head=untied, widened=widened,
                                files=files)
    write_json(record_file, record.model_dump())
    return record


def check_rotation(model_spec: ModelSpec, spec: RotateSpec) -> None:
    """Before any stage writes: a model whose family cannot be rotated (widened) is refused when asked to be."""
    arch = (read_config(model_spec.path).get("architectures") or [None])[0]
    if spec.enabled:
        try:
            check_rotatable(family_of_architecture(arch), arch)
        except HaloquantError as e:
            raise HaloquantError(f"rotate.enabled: {e}") from None
    if spec.widen is True and not stream_is_whole(model_spec):
        try:
            check_widenable(family_of_architecture(arch), arch)
        except HaloquantError as e:
            raise HaloquantError(f"rotate.widen: {e}") from None
