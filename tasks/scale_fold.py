"""scale_fold: per-channel scales that migrate activation outliers from a norm (or a preceding
linear) into the linears after it (haloquant/folding.py). The float function is unchanged; only
where quantization error falls moves.

Order: after allocate, so each group's α is searched at the formats its linears will really get
(a fold that helps Q3_K can hurt Q6_K). Sensitivity was measured unfolded; the fold only lowers
each chosen format's error, so the allocation stays valid.

Method `identity` folds nothing; `scale` searches α ∈ fold.alpha_grid per group (0 = no fold,
so a fold is only kept where it lowers the quantized output error).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from haloquant.artifacts import atomic_path, read_artifact, write_json
from haloquant.calibstats import CalibrationStats
from haloquant.folding import apply_fold, expand_scales, fold_groups, outlier_stats, search_alpha, weight_outliers
from haloquant.formats import get_format
from haloquant.modelio import load_model, resolve_device
from haloquant.schemas.artifacts import AllocationResult, FoldResult
from haloquant.schemas.params import FoldSpec, ModelSpec

FOLD_FILE = "fold.json"
SCALES_FILE = "scales.safetensors"
PLOT_FILE = "outliers.json"


def scale_fold(model_spec: ModelSpec, spec: FoldSpec, calib_dir: Path, allocation_dir: Path,
               out_dir: Path) -> FoldResult:
    scales: dict[str, torch.Tensor] = {}
    groups, plot = [], []
    if spec.method == "scale":
        _search(model_spec, spec, calib_dir, allocation_dir, scales, groups, plot)
    with atomic_path(out_dir / SCALES_FILE) as tmp:  # written even when empty: a declared output
        save_file({k: v.float().contiguous() for k, v in scales.items()}, str(tmp))
    result = FoldResult(method=spec.method, scales_file=SCALES_FILE, groups=groups)
    write_json(out_dir / FOLD_FILE, result.model_dump())
    write_json(out_dir / PLOT_FILE, plot)
    return result


def _search(model_spec: ModelSpec, spec: FoldSpec, calib_dir: Path, allocation_dir: Path,
            scales: dict[str, torch.Tensor], groups: list[dict], plot: list[dict]) -> None:
    allocation = read_artifact(allocation_dir / "allocation.json", AllocationResult)
    formats = {c.name.removesuffix(".weight"): c.format for c in allocation.tensors}
    model = load_model(model_spec.path, "cpu", model_spec.stream)  # the search's errors are computed on the host
    stats = CalibrationStats(calib_dir, model=model, device=resolve_device(model_spec.device))
    mods = dict(model.named_modules())
    for g in fold_groups(model):
        if any(get_format(formats[t]).is_float for t in g.targets):
            continue  # nothing to gain where the targets stay float
        key = stats.report.input_of[g.stats_module]
        x_max = stats.tensor(f"{key}.max_abs")
        x_mean = stats.tensor(f"{key}.mean_abs")
        gram = stats.gram_of(key).cpu()  # of the unfolded input: this group is folded only below
        w_before = torch.cat([mods[t].weight.detach() for t in g.targets])
        alpha, err, base, s = search_alpha(model, g, x_max, gram, formats, spec.alpha_grid)
        s_in = expand_scales(s, g, model)
        before = {**outlier_stats(x_max, x_mean), **{f"w_{k}": v for k, v in weight_outliers(w_before).items()}}
        if alpha > 0:
            apply_fold(model, g, s)
            scales[g.name] = s
        w_after = torch.cat([mods[t].weight.detach() for t in g.targets])
        after = {**outlier_stats(x_max / s_in if alpha > 0 else x_max, x_mean / s_in if alpha > 0 else x_mean),
                 **{f"w_{k}": v for k, v in weight_outliers(w_after).items()}}
        groups.append({"group": g.name, "alpha": alpha, "error_unfolded": base, "error_folded": err,
                       "before": before, "after": after})
        for when, st in (("before", before), ("after", after)):
            plot.append({"group": g.name, "when": when, **st})
