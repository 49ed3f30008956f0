"""rotate: the model the later stages quantize — the checkpoint itself, or a copy of it that computes
the same logits: widened to whole 256-blocks (rotate.widen, haloquant/widening.py), rotated
(rotate.enabled, haloquant/rotation.py), or both, widened first.

The copy goes to its own folder (left empty when there is none, so the stage's outputs are the same two
paths either way); the record names the copy's files with their hashes, so the stages after it depend
on that small file rather than hashing a model-sized folder again each time.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from haloquant import HaloquantError
from haloquant.artifacts import sha256_file, write_json
from haloquant.families import family_of_architecture
from haloquant.modelio import check_model_dir, read_config
from haloquant.rotation import check_rotatable, write_rotated
from haloquant.schemas.artifacts import RotationRecord
from haloquant.schemas.params import ModelSpec, RotateSpec
from haloquant.kquants import QK_K  # the k-quant and i-quant block: rows of whole blocks take every format
from haloquant.widening import check_widenable, widened_width, write_widened


def widens(model_spec: ModelSpec, spec: RotateSpec) -> bool:
    """Whether rotate.widen changes this checkpoint (its hidden width is not whole 256-blocks)."""
    if not spec.widen:
        return False
    hidden = read_config(model_spec.path).get("hidden_size")
    return isinstance(hidden, int) and widened_width(hidden, QK_K) != hidden


def copies_model(model_spec: ModelSpec, spec: RotateSpec) -> bool:
    """Whether the stages after `rotate` quantize a copy (artifacts/rotate/model) rather than model.path."""
    return spec.enabled or widens(model_spec, spec)


def rotate(model_spec: ModelSpec, spec: RotateSpec, record_file: Path, model_dir: Path) -> RotationRecord:
    src = check_model_dir(model_spec.path)  # what cannot be widened or rotated is refused in preflight
    shutil.rmtree(model_dir, ignore_errors=True)
    widen = widens(model_spec, spec)
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
    if widens(model_spec, spec):
        try:
            check_widenable(family_of_architecture(arch), arch)
        except HaloquantError as e:
            raise HaloquantError(f"rotate.widen: {e}") from None
