"""Running stages: the one code path behind `haloquant stage`, `dvc repro` and the Prefect flow."""

from __future__ import annotations

import json
from pathlib import Path

from haloquant import HaloquantError
from haloquant.artifacts import sha256_json, sha256_tree
from haloquant.modelio import check_model_dir
from haloquant.textdata import check_disjoint, read_text
from schemas.params import Params, load_params
from tasks import PRESET_PARAMS, STAGES, SWEEP_POINT_INPUTS, SWEEP_POINT_PARAMS, TRAIN_POLICY, Stage, find_stage

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def preflight(params: Params) -> None:
    """Input checks every stage runs before it writes anything."""
    check_model_dir(params.model.path)
    read_text(params.calibration.text, "calibration.text")
    read_text(params.validate_.text, "validate.text")
    check_disjoint(params.calibration.text, params.validate_.text)
    from tasks.allocate import require_costs

    require_costs(params.allocation.solver, params.sensitivity.metric)
    if params.allocation.solver == "sac":
        pol = params.allocation.policy
        if not (pol / "policy.zip").is_file() or not (pol / "policy.json").is_file():
            raise HaloquantError(f"allocation.policy: {str(pol)!r} is not a policy folder (expected policy.zip and "
                                 "policy.json, as the train_policy stage writes)")


def artifacts_root(params_file: Path) -> Path:
    return Path(params_file).resolve().parent / "artifacts"


def _lookup(params: Params, dotted: str):
    obj = params.model_dump(by_alias=True)
    for part in dotted.split("."):
        obj = obj[part]
    return obj


def input_paths(stage: Stage, params: Params, root: Path) -> list[Path]:
    out = []
    for item in stage.inputs:
        out.append(Path(_lookup(params, item[2:-1])) if item.startswith("${") else root / item)
    for key in stage.listed_inputs:
        out.extend(Path(x) for x in _lookup(params, key))
    return out


def fingerprint(stage: Stage, params: Params, root: Path) -> str:
    """Hash of what a stage's outputs are a function of: its spec sections, its input files and
    its code. Equal fingerprints ⇒ the stage would compute the same outputs."""
    spec = {k: _lookup(params, k) for k in stage.params}
    inputs = {}
    for p in input_paths(stage, params, root):
        inputs[str(p)] = sha256_tree(p) if p.exists() else None
    code = {c: sha256_tree(PROJECT_ROOT / c) for c in stage.code}
    return sha256_json({"stage": stage.name, "spec": spec, "inputs": inputs, "code": code})


def run_stage(name: str, params_file: Path) -> object:
    params = load_params(params_file)
    stage = find_stage(name, params)
    if stage is None:
        raise HaloquantError(f"unknown stage {name!r}; stages: {', '.join(s.name for s in STAGES)}, train_policy, "
                             "sweep@<bits> and preset@<name> as listed under sweep:, pareto")
    preflight(params)
    return stage.run(params, artifacts_root(params_file))


def run_all(params_file: Path) -> dict[str, object]:
    params = load_params(params_file)
    preflight(params)
    root = artifacts_root(params_file)
    return {s.name: s.run(params, root) for s in STAGES}


def dvc_yaml() -> str:
    """dvc.yaml generated from the stage registry."""
    import yaml

    stages = {}
    for s in STAGES + (TRAIN_POLICY,):
        d: dict = {"cmd": f"haloquant stage {s.name}"}
        d["deps"] = [i if i.startswith("${") else f"artifacts/{i}" for i in s.inputs] + list(s.code)
        d["params"] = list(s.params)
        d["outs"] = [f"artifacts/{o}" for o in s.outs]
        if s.metrics:
            d["metrics"] = [{f"artifacts/{m}": {"cache": False}} for m in s.metrics]
        if s.plots:
            d["plots"] = [{f"artifacts/{p}": {"cache": False}} for p in s.plots]
        stages[s.name] = d
    code = ["tasks/sweep.py", "haloquant", "schemas"]
    deps = lambda inputs: [i if i.startswith("${") else f"artifacts/{i}" for i in inputs] + code  # noqa: E731
    stages["sweep"] = {"foreach": "${sweep.bits_per_weight}", "do": {
        "cmd": "haloquant stage sweep@${item}", "deps": deps(SWEEP_POINT_INPUTS),
        "params": list(SWEEP_POINT_PARAMS), "outs": ["artifacts/sweep/bpw-${item}"]}}
    stages["preset"] = {"foreach": "${sweep.presets}", "do": {
        "cmd": "haloquant stage preset@${item}", "deps": deps(SWEEP_POINT_INPUTS[:4]),
        "params": list(PRESET_PARAMS), "outs": ["artifacts/sweep/preset-${item}"]}}
    stages["pareto"] = {"cmd": "haloquant stage pareto", "deps": ["artifacts/sweep"] + code,
                        "params": ["sweep.bits_per_weight", "sweep.presets"],
                        "plots": [{"artifacts/pareto/pareto.json": {"cache": False}}]}
    plots = [
        {"artifacts/pareto/pareto.json": {"x": "gguf_bytes", "y": "ppl", "template": "scatter",
                                          "title": "Size vs llama.cpp perplexity: haloquant sweep and llama.cpp presets"}},
        {"artifacts/allocate/bits_per_layer.json": {"x": "index", "y": "bits_per_weight",
                                                    "title": "Bits per weight by tensor"}},
        {"artifacts/validate/size_ppl.json": {"x": "bytes", "y": "ppl", "template": "scatter",
                                              "title": "Size vs perplexity"}},
        {"artifacts/train_policy/learning_curve.json": {"x": "step", "y": "proxy_regret",
                                                        "title": "SAC allocator: cost / MILP optimum − 1 while training"}},
    ]
    header = "# Generated by `haloquant dvc-yaml` from tasks/__init__.py; edit the registry, not this file.\n"
    return header + yaml.safe_dump({"stages": stages, "plots": plots}, sort_keys=False, width=120)


def describe(obj) -> str:
    if isinstance(obj, list):
        return json.dumps([describe(o) for o in obj])
    dump = obj.model_dump() if hasattr(obj, "model_dump") else obj
    small = {k: v for k, v in dump.items() if not isinstance(v, (list, dict)) or k in ("tensor_types", "gate")}
    return json.dumps(small, default=str)
