"""The pipeline's stages: one module per stage, one registry that both DVC and Prefect read.

Each `Stage` names the params keys it reads, the files it depends on, the files it writes and the
third-party runtimes whose versions decide its bytes; its code dependencies are *derived*: the
project modules its run function can execute (haloquant/codedeps.py). `dvc.yaml` is generated from
this registry (`haloquant dvc-yaml`), and the Prefect flow caches on the same declarations, so the
two never drift. A stage with `foreach` is a template: one stage per item of a params list (the
budget sweep, llama.cpp's presets), `foreach` in dvc.yaml and one mapped task each in Prefect.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable

from haloquant.codedeps import imported_names, project_modules
from haloquant.schemas.params import Params

ITEM = "${item}"
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Stage:
    name: str
    params: tuple[str, ...]  # params.yaml keys this stage reads
    inputs: tuple[str, ...]  # files/folders read: "${key}" refers to a path in params.yaml
    outs: tuple[str, ...]  # files/folders written, relative to the artifacts root
    run: Callable[..., object] = field(repr=False, compare=False)  # (params, root[, item])
    metrics: tuple[str, ...] = ()
    plots: tuple[str, ...] = ()
    # params keys holding lists of folders the stage reads: hashed by the Prefect cache key; DVC
    # cannot interpolate a list into deps, so there the params entry itself is what triggers a re-run
    listed_inputs: tuple[str, ...] = ()
    runtimes: tuple[str, ...] = ("torch",)  # haloquant/environment.py: third-party code in its cache key
    foreach: str | None = None  # params key of a list: a template, one stage per item ("${item}" below)
    item: object = None  # the item of a stage made from a template
    uncached: tuple[str, ...] = ()  # outputs DVC records but does not copy into its cache (model-sized folders)

    @property
    def code(self) -> tuple[str, ...]:
        """Repository-relative files of every project module the run function can execute."""
        return stage_code(self.run.func if isinstance(self.run, partial) else self.run)

    def all_outs(self) -> tuple[str, ...]:
        return self.outs + self.uncached + self.metrics + self.plots

    def at(self, item) -> "Stage":
        """The template's stage for one item (names and paths with the item as DVC renders it)."""
        label = item_label(item)
        sub = lambda xs: tuple(x.replace(ITEM, label) for x in xs)  # noqa: E731
        return replace(self, name=f"{self.name}@{label}", inputs=sub(self.inputs), outs=sub(self.outs),
                       uncached=sub(self.uncached), metrics=sub(self.metrics), plots=sub(self.plots),
                       run=partial(self.run, item=item),
                       foreach=None, item=item)


@functools.cache
def stage_code(run: Callable) -> tuple[str, ...]:
    roots = [__name__, *sorted(n for n in imported_names(inspect.getsource(run), __name__)
                               if n.startswith("haloquant"))]
    files = project_modules(roots).values()
    return tuple(sorted(str(f.resolve().relative_to(REPO)) for f in files))


def item_label(item) -> str:
    """How DVC's foreach renders an item (a budget written 4.0 → "4.0"): stage and folder names
    must match it (the schema rejects integer budgets for this reason)."""
    return str(float(item)) if isinstance(item, float) else str(item)


ROTATED_MODEL = "rotate/model"  # the rotated copy (an empty folder when rotation is off)
WIDENING_PLAN = "plan_widening/widening.json"


def _plan_widening(p: Params, root: Path):
    from haloquant.tasks.plan_widening import plan_widening
    return plan_widening(p.model, p.rotate, p.sensitivity, p.allocation, root / WIDENING_PLAN)


def _rotate(p: Params, root: Path):
    from haloquant.tasks.rotate import rotate
    return rotate(p.model, p.rotate, root / WIDENING_PLAN, root / ROTATION[0], root / ROTATED_MODEL)


def _model(p: Params, root: Path):
    """The model every stage after `rotate` quantizes: the checkpoint, or its widened and/or rotated copy."""
    from haloquant.tasks.rotate import copies_model
    return p.model.model_copy(update={"path": root / ROTATED_MODEL}) if copies_model(root / ROTATION[0]) else p.model


def _calibrate(p: Params, root: Path):
    from haloquant.tasks.calibrate import calibrate
    return calibrate(_model(p, root), p.calibration, root / "calibrate")


def _sensitivity(p: Params, root: Path):
    from haloquant.tasks.sensitivity import score_sensitivity
    return score_sensitivity(_model(p, root), p.sensitivity, p.quantize, root / "calibrate", root / "sensitivity")


def _allocate(p: Params, root: Path):
    from haloquant.tasks.allocate import allocate
    return allocate(p.allocation, root / "sensitivity", root / "allocate", _model(p, root), p.quantize,
                    root / "calibrate")


def _scale_fold(p: Params, root: Path):
    from haloquant.tasks.scale_fold import scale_fold
    return scale_fold(_model(p, root), p.fold, root / "calibrate", root / "allocate", root / "scale_fold")


def _quantize(p: Params, root: Path):
    from haloquant.tasks.quantize import quantize
    return quantize(_model(p, root), p.quantize, root / "calibrate", root / "allocate", root / "scale_fold",
                    root / "quantize")


def _export_gguf(p: Params, root: Path):
    from haloquant.tasks.export_gguf import export_gguf
    return export_gguf(_model(p, root), p.export.gguf, root / "quantize", root / "export_gguf")


def _export_onnx(p: Params, root: Path):
    from haloquant.tasks.export_onnx import export_onnx
    return export_onnx(_model(p, root), p.export.onnx, root / "quantize", root / "export_onnx")


def _validate(p: Params, root: Path):
    """The quantized model against the checkpoint itself (not its rotated copy) as the float reference."""
    from haloquant.tasks.validate import validate
    return validate(_model(p, root), p.validate_, root / "calibrate", root / "quantize", root / "export_gguf",
                    root / "export_onnx", root / "validate", reference=p.model)


ROTATION = ("rotate/rotation.json",)  # what the stages after `rotate` read of it (the copy's files by hash)
CALIB_OUTS = ("calibrate/stats.safetensors", "calibrate/calibration.json")
SENS_OUTS = ("sensitivity/sensitivity.json", "sensitivity/embeddings.json")
STAGES: tuple[Stage, ...] = (
    # rotate.widen auto reads the budget and the candidate formats (is the budget feasible unwidened?); the
    # copy does not, so a budget edit re-runs only this decision unless it changes
    Stage("plan_widening", ("model", "rotate.widen", "sensitivity", "allocation.budget", "allocation.rules"),
          ("${model.path}",), (WIDENING_PLAN,),
          _plan_widening, runtimes=("torch", "converter")),  # a file-size budget: the converter's metadata
    Stage("rotate", ("model", "rotate.enabled", "rotate.seed", "rotate.heads"), ("${model.path}", WIDENING_PLAN),
          ROTATION, _rotate, uncached=(ROTATED_MODEL,)),
    Stage("calibrate", ("model", "calibration"), ("${model.path}", "${calibration.text}") + ROTATION, CALIB_OUTS,
          _calibrate),
    Stage("sensitivity", ("model", "sensitivity", "quantize.method", "quantize.gptq", "quantize.importance"),
          ("${model.path}",) + ROTATION + CALIB_OUTS, SENS_OUTS, _sensitivity,
          runtimes=("torch", "llama.cpp", "converter")),
    # the model, its calibration and quantizer (as sensitivity measures it, plus the row-scale correction): for
    # allocation.refine's measured KL
    Stage("allocate", ("allocation", "model", "quantize.method", "quantize.gptq", "quantize.importance",
                       "quantize.correct_row_scales"), ("${model.path}",) + ROTATION + CALIB_OUTS + SENS_OUTS + (
          "${allocation.policy}",), ("allocate/allocation.json",),
          _allocate, plots=("allocate/bits_per_layer.json",), runtimes=("torch", "llama.cpp")),
    Stage("scale_fold", ("model", "fold"), ("${model.path}",) + ROTATION + CALIB_OUTS + ("allocate/allocation.json",),
          ("scale_fold/fold.json", "scale_fold/scales.safetensors"), _scale_fold, plots=("scale_fold/outliers.json",),
          runtimes=("torch", "llama.cpp")),
    Stage("quantize", ("model", "quantize"), ("${model.path}",) + ROTATION + CALIB_OUTS + (
          "allocate/allocation.json", "scale_fold/fold.json", "scale_fold/scales.safetensors"),
          ("quantize/tensors.safetensors", "quantize/quantized.json"), _quantize, runtimes=("torch", "llama.cpp")),
    Stage("export_gguf", ("model", "export.gguf"), ("${model.path}",) + ROTATION + ("quantize/tensors.safetensors",
          "quantize/quantized.json"), ("export_gguf/model.gguf", "export_gguf/export.json"), _export_gguf,
          runtimes=("torch", "converter")),
    Stage("export_onnx", ("model", "export.onnx"), ("${model.path}",) + ROTATION + ("quantize/tensors.safetensors",
          "quantize/quantized.json"), ("export_onnx",), _export_onnx, runtimes=("torch", "onnx")),
    Stage("validate", ("model", "validate"), ("${model.path}", "${validate.text}") + ROTATION + (
          "calibrate/calibration.json", "quantize/tensors.safetensors", "quantize/quantized.json",
          "export_gguf/model.gguf", "export_onnx"),
          ("validate/report.json",), _validate, metrics=("validate/metrics.json",),
          plots=("validate/size_ppl.json",), runtimes=("torch", "llama.cpp", "onnx")),
)

# what the budget sweep and the policy training share with the main flow (rotate.widen auto decides on the
# main budget; a sweep point below the checkpoint's smallest file is infeasible unless it widened)
SHARED_STAGES = tuple(s for s in STAGES if s.name in ("plan_widening", "rotate", "calibrate", "sensitivity"))


def _train_policy(p: Params, root: Path):
    from haloquant.tasks.train_policy import check_other_runs, train_policy
    check_other_runs(p.train_policy.also_on)
    roots = [root, *p.train_policy.also_on]
    return train_policy(p.train_policy, [r / "sensitivity" for r in roots], [r / "calibrate" for r in roots],
                        root / "train_policy")


# Not part of the quantization pipeline (its own Prefect flow, `haloquant flow --train-policy`);
# allocation.solver sac reads a policy folder, e.g. policies/ or artifacts/train_policy.
TRAIN_POLICY = Stage("train_policy", ("train_policy",), ("calibrate/calibration.json",) + SENS_OUTS,
                     ("train_policy/policy.zip", "train_policy/policy.json"), _train_policy,
                     plots=("train_policy/learning_curve.json",), listed_inputs=("train_policy.also_on",))


# ---------------------------------------------------------------- the budget sweep (Pareto front)

# under the artifacts root: the folder of one sweep budget (its item_label) and of one preset
BUDGET_POINT_DIR, PRESET_POINT_DIR = "sweep/bpw-{}", "sweep/preset-{}"


def _quantized(p: Params, root: Path) -> Params:
    return p.model_copy(update={"model": _model(p, root)})


def _sweep_point(p: Params, root: Path, item: float):
    from haloquant.tasks.sweep import sweep_point
    return sweep_point(_quantized(p, root), item, root, root / BUDGET_POINT_DIR.format(item_label(item)))


def _preset_point(p: Params, root: Path, item: str):
    """llama.cpp's preset of the model the pipeline quantizes (the rotated copy when rotation is on:
    the calibration imatrix is of that model)."""
    from haloquant.tasks.sweep import preset_point
    return preset_point(_quantized(p, root), item, root, root / PRESET_POINT_DIR.format(item))


def _pareto(p: Params, root: Path):
    from haloquant.tasks.pareto import pareto
    return pareto(p, root, root / "pareto")


SWEEP_POINT_INPUTS = ("${model.path}", "${validate.text}") + ROTATION + CALIB_OUTS + SENS_OUTS + (
    "${allocation.policy}",)
SWEEP = Stage("sweep", ("model", "allocation.solver", "allocation.rules", "allocation.time_limit_s", "allocation.policy",
                        "allocation.refine", "fold", "quantize", "validate", "export.gguf", "sweep.max_chunks"),  # not the budget: each
              SWEEP_POINT_INPUTS, (BUDGET_POINT_DIR.format(ITEM),), _sweep_point,              # point has its own
              runtimes=("torch", "llama.cpp", "converter"), foreach="sweep.bits_per_weight")
PRESET = Stage("preset", ("model", "validate", "export.gguf", "sweep.max_chunks"), SWEEP_POINT_INPUTS[:5],
               (PRESET_POINT_DIR.format(ITEM),), _preset_point, runtimes=("torch", "llama.cpp", "converter"),
               foreach="sweep.presets")
PARETO = Stage("pareto", ("sweep.bits_per_weight", "sweep.presets"), ("sweep",), (), _pareto,
               plots=("pareto/pareto.json",))
SWEEP_STAGES = (SWEEP, PRESET, PARETO)  # templates and the plot that gathers their points
ALL_STAGES = STAGES + (TRAIN_POLICY,) + SWEEP_STAGES


def _items(p: Params, key: str) -> list:
    obj = p.model_dump(by_alias=True)
    for part in key.split("."):
        obj = obj[part]
    return list(obj)


def expand(stages: tuple[Stage, ...], p: Params) -> tuple[Stage, ...]:
    """Templates replaced by their stages for the items `p` lists."""
    return tuple(s2 for s in stages for s2 in ([s.at(i) for i in _items(p, s.foreach)] if s.foreach else [s]))


def sweep_stages(p: Params) -> tuple[Stage, ...]:
    """One stage per sweep budget and per llama.cpp preset, then the plot that gathers them."""
    return expand(SWEEP_STAGES, p)


def find_stage(name: str, p: Params) -> Stage | None:
    return next((s for s in expand(ALL_STAGES, p) if s.name == name), None)
