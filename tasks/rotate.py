"""rotate: the model the later stages quantize — the checkpoint itself, or a copy of it that computes
the same logits: widened to whole 256-blocks (haloquant/widening.py; when the plan_widening stage says
so), rotated (rotate.enabled, haloquant/rotation.py), or both, widened first.

The copy goes to its own folder (left empty when there is none, so the stage's outputs are the same two
paths either way); the record names the copy's files with their hashes, so the stages after it depend
on that small file rather than hashing a model-sized folder again each time. Whether the later stages
read the copy is the record's to say (`copies_model`), so the decision is made once, here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from haloquant import HaloquantError
from haloquant.artifacts import read_artifact, sha256_file, write_json
from haloquant.families import family_of_architecture
from haloquant.kquants import QK_K
from haloquant.modelio import check_model_dir, read_config
from haloquant.rotation import check_rotatable, write_rotated
from haloquant.schemas.artifacts import RotationRecord, WideningPlan
from haloquant.schemas.params import ModelSpec, RotateSpec
from haloquant.tasks.plan_widening import stream_is_whole
from haloquant.widening import check_widenable, write_widened


def copies_model(record_file: Path) -> bool:
    """Whether the stages after `rotate` quantize its copy (artifacts/rotate/model) rather than model.path:
    the rotate stage's record says."""
    if not Path(record_file).is_file():
        raise HaloquantError(f"{record_file}: missing — the rotate stage has not run (dvc repro rotate)")
    record = read_artifact(record_file, RotationRecord)
    return record.enabled or record.widened is not None


def read_plan(plan_file: Path) -> WideningPlan:
    if not Path(plan_file).is_file():
        raise HaloquantError(f"{plan_file}: missing — the plan_widening stage has not run (dvc repro plan_widening)")
    return read_artifact(plan_file, WideningPlan)


def rotate(model_spec: ModelSpec, spec: RotateSpec, plan_file: Path, record_file: Path,
           model_dir: Path) -> RotationRecord:
    src = check_model_dir(model_spec.path)  # what cannot be widened or rotated is refused in preflight
    widen = read_plan(plan_file).widen
    shutil.rmtree(model_dir, ignore_errors=True)
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
