"""rotate: the model the later stages quantize — the checkpoint itself, or (rotate.enabled) a rotated
copy of it that computes the same logits (haloquant/rotation.py).

The copy goes to its own folder (left empty when rotation is off, so the stage's outputs are the
same two paths either way); the record names the copy's files with their hashes, so the stages after
it depend on that small file rather than hashing a model-sized folder again each time.
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


def rotate(model_spec: ModelSpec, spec: RotateSpec, record_file: Path, model_dir: Path) -> RotationRecord:
    src = check_model_dir(model_spec.path)  # a family without rotation is refused in preflight (check_rotation)
    if not spec.enabled:
        shutil.rmtree(model_dir, ignore_errors=True)
        model_dir.mkdir(parents=True)
        record = RotationRecord(enabled=False, model=src.name)
    else:
        report = write_rotated(src, model_dir, spec.seed, spec.heads)
        files = {f.name: sha256_file(f) for f in sorted(model_dir.iterdir()) if f.is_file()}
        record = RotationRecord(enabled=True, model=src.name, seed=spec.seed, heads=spec.heads,
                                untied_head=report["untied_head"], files=files)
    write_json(record_file, record.model_dump())
    return record


def check_rotation(model_spec: ModelSpec, spec: RotateSpec) -> None:
    """Before any stage writes: a model whose family cannot be rotated is refused when rotation is on."""
    if not spec.enabled:
        return
    arch = (read_config(model_spec.path).get("architectures") or [None])[0]
    try:
        check_rotatable(family_of_architecture(arch), arch)
    except HaloquantError as e:
        raise HaloquantError(f"rotate.enabled: {e}") from None
