"""The pipeline's stages: one module per stage, one registry that both DVC and Prefect read.

Each `Stage` names the params keys it reads, the files it depends on and the files it writes;
`dvc.yaml` is generated from this registry (`haloquant dvc-yaml`), and the Prefect flow caches on
the same declarations, so the two never drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

from schemas.params import Params


@dataclass(frozen=True)
class Stage:
    name: str
    params: tuple[str, ...]  # params.yaml keys this stage reads
    inputs: tuple[str, ...]  # files/folders read: "${key}" refers to a path in params.yaml
    outs: tuple[str, ...]  # files/folders written, relative to the artifacts root
    run: Callable[[Params, Path], object] = field(repr=False, compare=False)
    metrics: tuple[str, ...] = ()
    plots: tuple[str, ...] = ()
    # params keys holding lists of folders the stage reads: hashed by the Prefect cache key; DVC
    # cannot interpolate a list into deps, so there the params entry itself is what triggers a re-run
    listed_inputs: tuple[str, ...] = ()
    module: str = ""  # tasks/<module>.py holds its code; default: the stage's name

    @property
    def code(self) -> tuple[str, ...]:
        return (f"tasks/{self.module or self.name}.py", "haloquant", "schemas")

    def all_outs(self) -> tuple[str, ...]:
        return self.outs + self.metrics + self.plots


def _calibrate(p: Params, root: Path):
    from tasks.calibrate import calibrate
    return calibrate(p.model, p.calibration, root / "calibrate")


def _sensitivity(p: Params, root: Path):
    from tasks.sensitivity import score_sensitivity
    return score_sensitivity(p.model, p.sensitivity, p.quantize, root / "calibrate", root / "sensitivity")


def _allocate(p: Params, root: Path):
    from tasks.allocate import allocate
    return allocate(p.allocation, root / "sensitivity", root / "allocate")


def _scale_fold(p: Params, root: Path):
    from tasks.scale_fold import scale_fold
    return scale_fold(p.model, p.fold, root / "calibrate", root / "allocate", root / "scale_fold")


def _quantize(p: Params, root: Path):
    from tasks.quantize import quantize
    return quantize(p.model, p.quantize, root / "calibrate", root / "allocate", root / "scale_fold",
                    root / "quantize")


def _export_gguf(p: Params, root: Path):
    from tasks.export_gguf import export_gguf
    return export_gguf(p.model, p.export.gguf, root / "quantize", root / "export_gguf")


def _export_onnx(p: Params, root: Path):
    from tasks.export_onnx import export_onnx
    return export_onnx(p.model, p.export.onnx, root / "quantize", root / "export_onnx")


def _validate(p: Params, root: Path):
    from tasks.validate import validate
    return validate(p.model, p.validate_, root / "calibrate", root / "quantize", root / "export_gguf",
                    root / "export_onnx", root / "validate")


STAGES: tuple[Stage, ...] = (
    Stage("calibrate", ("model", "calibration"), ("${model.path}", "${calibration.text}"),
          ("calibrate/stats.safetensors", "calibrate/calibration.json"), _calibrate),
    Stage("sensitivity", ("model", "sensitivity", "quantize"), ("${model.path}", "calibrate/stats.safetensors",
          "calibrate/calibration.json"), ("sensitivity/sensitivity.json", "sensitivity/embeddings.json"),
          _sensitivity),
    Stage("allocate", ("allocation",), ("sensitivity/sensitivity.json", "sensitivity/embeddings.json",
                                        "${allocation.policy}"), ("allocate/allocation.json",),
          _allocate, plots=("allocate/bits_per_layer.json",)),
    Stage("scale_fold", ("model", "fold"), ("${model.path}", "calibrate/stats.safetensors",
          "calibrate/calibration.json", "allocate/allocation.json"),
          ("scale_fold/fold.json", "scale_fold/scales.safetensors"), _scale_fold,
          plots=("scale_fold/outliers.json",)),
    Stage("quantize", ("model", "quantize"), ("${model.path}", "calibrate/stats.safetensors",
          "calibrate/calibration.json", "allocate/allocation.json", "scale_fold/fold.json",
          "scale_fold/scales.safetensors"),
          ("quantize/tensors.safetensors", "quantize/quantized.json"), _quantize),
    Stage("export_gguf", ("model", "export.gguf"), ("${model.path}", "quantize/tensors.safetensors",
          "quantize/quantized.json"), ("export_gguf/model.gguf", "export_gguf/export.json"), _export_gguf),
    Stage("export_onnx", ("model", "export.onnx"), ("${model.path}", "quantize/tensors.safetensors",
          "quantize/quantized.json"), ("export_onnx",), _export_onnx),
    Stage("validate", ("model", "validate"), ("${model.path}", "${validate.text}", "calibrate/calibration.json",
          "quantize/tensors.safetensors", "quantize/quantized.json", "export_gguf/model.gguf", "export_onnx"),
          ("validate/report.json",), _validate, metrics=("validate/metrics.json",),
          plots=("validate/size_ppl.json",)),
)


def _train_policy(p: Params, root: Path):
    from tasks.train_policy import check_other_runs, train_policy
    check_other_runs(p.train_policy.also_on)
    roots = [root, *p.train_policy.also_on]
    return train_policy(p.train_policy, [r / "sensitivity" for r in roots], [r / "calibrate" for r in roots],
                        root / "train_policy")


# Not part of the quantization pipeline (its own Prefect flow, `haloquant flow --train-policy`);
# allocation.solver sac reads a policy folder, e.g. policies/ or artifacts/train_policy.
TRAIN_POLICY = Stage("train_policy", ("train_policy",), ("calibrate/calibration.json", "sensitivity/sensitivity.json",
                     "sensitivity/embeddings.json"), ("train_policy/policy.zip", "train_policy/policy.json"),
                     _train_policy, plots=("train_policy/learning_curve.json",),
                     listed_inputs=("train_policy.also_on",))
STAGE_BY_NAME = {s.name: s for s in STAGES + (TRAIN_POLICY,)}


# ---------------------------------------------------------------- the budget sweep (Pareto front)

def budget_label(bits: float) -> str:
    """How DVC's foreach renders a budget written as a float literal (4.0 → "4.0"): stage and
    folder names must match it (schemas reject integer literals for this reason)."""
    return str(float(bits))


def _sweep_point(p: Params, root: Path, bits: float):
    from tasks.sweep import sweep_point
    return sweep_point(p, bits, root, root / "sweep" / f"bpw-{budget_label(bits)}")


def _preset_point(p: Params, root: Path, preset: str):
    from tasks.sweep import preset_point
    return preset_point(p, preset, root, root / "sweep" / f"preset-{preset}")


def _pareto(p: Params, root: Path):
    from tasks.sweep import pareto
    return pareto(p, root / "sweep", root / "pareto")


SWEEP_POINT_INPUTS = ("${model.path}", "${validate.text}", "calibrate/stats.safetensors", "calibrate/calibration.json",
                      "sensitivity/sensitivity.json", "sensitivity/embeddings.json", "${allocation.policy}")
# not allocation.budget (each point has its own) nor the lists of points (each point is a stage)
SWEEP_POINT_PARAMS = ("model", "allocation.solver", "allocation.rules", "allocation.time_limit_s", "allocation.policy",
                      "fold", "quantize",
                      "validate", "export.gguf", "sweep.max_chunks")
PRESET_PARAMS = ("model", "validate", "export.gguf", "sweep.max_chunks")


def sweep_stages(p: Params) -> tuple[Stage, ...]:
    """One stage per sweep budget and per llama.cpp preset, then the plot that gathers them."""
    points = tuple(Stage(f"sweep@{budget_label(b)}", SWEEP_POINT_PARAMS, SWEEP_POINT_INPUTS,
                         (f"sweep/bpw-{budget_label(b)}",),
                         partial(_sweep_point, bits=b), module="sweep") for b in p.sweep.bits_per_weight)
    presets = tuple(Stage(f"preset@{x}", PRESET_PARAMS, SWEEP_POINT_INPUTS[:4], (f"sweep/preset-{x}",),
                          partial(_preset_point, preset=x), module="sweep") for x in p.sweep.presets)
    pareto = Stage("pareto", ("sweep",), tuple(o for s in points + presets for o in s.outs), (), _pareto,
                   plots=("pareto/pareto.json",), module="sweep")
    return points + presets + (pareto,)


def find_stage(name: str, p: Params) -> Stage | None:
    return STAGE_BY_NAME.get(name) or next((s for s in sweep_stages(p) if s.name == name), None)
