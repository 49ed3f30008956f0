"""Running stages: the one code path behind `haloquant stage`, `dvc repro` and the Prefect flow.

A stage's fingerprint — its Prefect cache key — hashes what its outputs are a function of: the
spec sections it reads (paths by the content they name, not where they are), its input files'
contents, the files of every project module its run function can execute (derived from the import
graph, haloquant/codedeps.py) and the versions of the runtimes it declares
(haloquant/environment.py). dvc.yaml is generated from the same registry, with the same code files
and the runtimes' version files (written by the `environment` stage) as deps.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from haloquant import HaloquantError
from haloquant.artifacts import remove_leftovers, sha256_json, sha256_tree, write_json
from haloquant.environment import RUNTIMES, environment_file, runtime_versions
from haloquant.inputs import check_model_files
from haloquant.resume import journal_for
from haloquant.schemas.params import Params, load_params
from haloquant.tasks import ALL_STAGES, REPO, STAGES, Stage, expand, find_stage
from haloquant.tasks.rotate import check_rotation
from haloquant.textdata import check_disjoint, read_text

log = logging.getLogger("haloquant.stages")

TIMING_DIR = ".timing"  # under the artifacts root: wall time of each stage's last run (not an artifact)
RESUME_DIR = ".resume"  # under the artifacts root: interrupted stages' finished items (haloquant/resume.py)


def preflight(params: Params) -> None:
    """Input checks every stage runs before it writes anything."""
    check_model_files(params.model.path)
    check_rotation(params.model, params.rotate)
    if params.quantize.end_to_end.iters and params.model.stream is True:
        raise HaloquantError("quantize.end_to_end.iters: end-to-end tuning needs the whole model on one device, "
                             "and model.stream is true; set end_to_end.iters to 0 or model.stream to false")
    read_text(params.calibration.text, "calibration.text")
    read_text(params.validate_.text, "validate.text")
    check_disjoint(params.calibration.text, params.validate_.text)
    from haloquant.tasks.allocate import require_costs

    require_costs(params.allocation.solver, params.sensitivity.metric)
    if params.allocation.solver == "sac":
        from haloquant.policy import check_policy_folder

        check_policy_folder(params.allocation.policy)


def artifacts_root(params_file: Path) -> Path:
    return Path(params_file).resolve().parent / "artifacts"


def _lookup(params: Params, dotted: str):
    obj = params.model_dump(by_alias=True)
    for part in dotted.split("."):
        obj = obj[part]
    return obj


def input_paths(stage: Stage, params: Params, root: Path) -> dict[str, Path]:
    """Declared input (as dvc.yaml writes it) → its path."""
    out = {}
    for item in stage.inputs:
        out[item] = Path(_lookup(params, item[2:-1])) if item.startswith("${") else root / item
    for key in stage.listed_inputs:
        out.update({f"{key}[{i}]": Path(x) for i, x in enumerate(_lookup(params, key))})
    return out


def _without_paths(obj):
    """Spec values with the paths replaced by None: a path stands for content, which the inputs hash."""
    if isinstance(obj, dict):
        return {k: _without_paths(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_without_paths(v) for v in obj]
    return None if isinstance(obj, Path) else obj


def fingerprint_parts(stage: Stage, params: Params, root: Path) -> dict:
    """What a stage's outputs are a function of: its spec sections, its input files' hashes, its
    code files' hashes and its runtimes' versions (kept in the flow's records, to say what changed)."""
    spec = {k: _without_paths(_lookup(params, k)) for k in stage.params}
    inputs = {k: sha256_tree(p) if p.exists() else None for k, p in input_paths(stage, params, root).items()}
    code = {c: sha256_tree(REPO / c) for c in stage.code}
    return {"stage": stage.name, "item": stage.item, "spec": spec, "inputs": inputs, "code": code,
            "runtimes": runtime_versions(stage.runtimes)}


def fingerprint(stage: Stage, params: Params, root: Path) -> str:
    """Hash of `fingerprint_parts`. Equal fingerprints ⇒ the stage would compute the same outputs."""
    return sha256_json(fingerprint_parts(stage, params, root))


def what_changed(old: dict, new: dict) -> list[str]:
    """Between two `fingerprint_parts`, what differs, as a person reads it."""
    out = [f"spec {k}" for k in new["spec"] if old.get("spec", {}).get(k, object()) != new["spec"][k]]
    for k, h in new["inputs"].items():
        if old.get("inputs", {}).get(k, object()) != h:
            out.append(f"input {k[2:-1] if k.startswith('${') else k}")
    out += [f"code {c}" for c, h in new["code"].items() if old.get("code", {}).get(c) != h]
    out += [f"code {c} (removed)" for c in old.get("code", {}) if c not in new["code"]]
    out += [f"{r} version" for r, v in new["runtimes"].items() if old.get("runtimes", {}).get(r) != v]
    return out


def stage_names(params: Params) -> str:
    return ", ".join(s.name for s in expand(ALL_STAGES, params)) + ", environment"


def run_stage(name: str, params_file: Path) -> object:
    params = load_params(params_file)
    root = artifacts_root(params_file)
    if name == "environment":
        return write_environment(root)
    stage = find_stage(name, params)
    if stage is None:
        raise HaloquantError(f"unknown stage {name!r}; stages: {stage_names(params)}")
    preflight(params)
    return timed(stage, params, root)


def timed(stage: Stage, params: Params, root: Path) -> object:
    """Run the stage after removing what an interrupted run of it left; see `timed_line`."""
    return timed_line(stage, params, root)[0]


def timed_line(stage: Stage, params: Params, root: Path) -> tuple[object, str]:
    """`timed`, and the stage's one-line summary (what it wrote, its size, its time), which it also
    logs. Its wall time is kept outside the artifacts (artifacts/.timing/<stage>.json)."""
    for out in stage.all_outs():
        remove_leftovers(root / out)
    t0 = time.perf_counter()
    with journal_for(root / RESUME_DIR / stage.name, lambda: fingerprint(stage, params, root)):
        result = stage.run(params, root)  # an interrupted run's finished items are taken (haloquant/resume.py)
    seconds = time.perf_counter() - t0
    write_json(root / TIMING_DIR / f"{stage.name}.json", {"stage": stage.name, "seconds": seconds})
    line = describe(stage.name, result, seconds, sum(_bytes_under(root / o) for o in stage.all_outs()))
    log.info(line)
    return result, line


def _bytes_under(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def run_all(params_file: Path) -> dict[str, object]:
    """Every main stage in order, uncached (each logs its summary line as it ends)."""
    params = load_params(params_file)
    preflight(params)
    root = artifacts_root(params_file)
    return {s.name: timed(s, params, root) for s in STAGES}


def write_environment(root: Path) -> dict[str, dict]:
    """The `environment` stage (DVC's, always run): one file per runtime with its versions, so a
    stage that declares the runtime re-runs when, and only when, they change."""
    versions = runtime_versions(tuple(RUNTIMES))
    for name, v in versions.items():
        write_json(environment_file(root, name), v)
    return versions


def _dvc_stage(s: Stage, code_dir: str) -> dict:
    d: dict = {"cmd": f"haloquant stage {s.name}" + ("@${item}" if s.foreach else "")}
    d["deps"] = [i if i.startswith("${") else f"artifacts/{i}" for i in s.inputs] + \
        [f"{code_dir}{c}" for c in s.code] + [f"artifacts/{environment_file(Path(), r).as_posix()}" for r in s.runtimes]
    d["params"] = list(s.params)
    if s.outs or s.uncached:
        d["outs"] = [f"artifacts/{o}" for o in s.outs] + [{f"artifacts/{o}": {"cache": False}} for o in s.uncached]
    if s.metrics:
        d["metrics"] = [{f"artifacts/{m}": {"cache": False}} for m in s.metrics]
    if s.plots:
        d["plots"] = [{f"artifacts/{p}": {"cache": False}} for p in s.plots]
    return {"foreach": f"${{{s.foreach}}}", "do": d} if s.foreach else d


def code_prefix(folder: Path | None) -> str:
    """How a dvc.yaml in `folder` (None: the repository root) names the project's code files: relative
    to the haloquant checkout that holds `folder` (this one, or a copy of it), absolute otherwise."""
    if folder is None:
        return ""
    folder = Path(folder).resolve()
    root = next((d for d in (folder, *folder.parents) if (d / "pyproject.toml").is_file()
                 and (d / "tasks" / "__init__.py").is_file()), None)
    if root is None:
        return REPO.as_posix() + "/"
    rel = os.path.relpath(root, folder)
    return "" if rel == "." else Path(rel).as_posix() + "/"


def dvc_yaml(folder: Path | None = None, header: str | None = None) -> str:
    """dvc.yaml generated from the stage registry, for params.yaml beside it: the repository's
    own, or (`folder`) a fleet member's, whose code dependencies are named relative to it."""
    import yaml

    stages = {"environment": {"cmd": "haloquant stage environment", "always_changed": True,
                              "outs": [{f"artifacts/{environment_file(Path(), r).as_posix()}": {"cache": False}}
                                       for r in RUNTIMES]}}
    stages.update({s.name: _dvc_stage(s, code_prefix(folder)) for s in ALL_STAGES})
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
    header = header or "# Generated by `haloquant dvc-yaml` from tasks/__init__.py; edit the registry, not this file.\n"
    return header + yaml.safe_dump({"stages": stages, "plots": plots}, sort_keys=False, width=120)


def dvc_keys() -> list[str]:
    """params keys a generated dvc.yaml reads: those it interpolates (`${model.path}`, a sweep's
    `foreach` list) and those its stages track."""
    keys = {i[2:-1] for s in ALL_STAGES for i in s.inputs if i.startswith("${")}
    return sorted(keys | {s.foreach for s in ALL_STAGES if s.foreach} | {k for s in ALL_STAGES for k in s.params})


def unwritten_dvc_keys(params_file: Path) -> list[str]:
    """The keys dvc.yaml reads that `params_file` does not write out: DVC reads them from the file itself,
    where the schema's defaults do not exist, and refuses the stage (`dvc repro`) when one is missing."""
    import yaml

    data = yaml.safe_load(Path(params_file).read_text())
    missing = []
    for key in dvc_keys():
        node = data
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            missing.append(key)
    return missing


def describe(name: str, obj, seconds: float, out_bytes: int) -> str:
    """One line a person reads: what the stage wrote, how many bytes, in how long."""
    from haloquant.progress import duration, size
    from haloquant.tasks.summaries import summary

    return f"{name}: {summary(obj)} ({size(out_bytes)} written in {duration(seconds)})"


def check(params_file: Path) -> str:
    """`haloquant check`: the spec, and every input as deep as a run would see it — headers and
    shapes, every weight finite, the tokenizer, enough calibration and evaluation text; and which
    keys `dvc repro` would miss in the file."""
    from haloquant.inputs import check_enough_tokens, check_finite
    from haloquant.modelio import load_model, load_tokenizer
    from haloquant.textdata import sequence_bos, tokenize

    params = load_params(params_file)
    preflight(params)
    model = load_model(params.model.path, "cpu", params.model.stream)  # streamed: bf16 stays bf16 on the host
    check_finite(model)
    tok = load_tokenizer(params.model.path)
    bos = sequence_bos(tok, params.model.add_bos)
    cal, val = params.calibration, params.validate_
    n_cal = len(tokenize(tok, read_text(cal.text, "calibration.text")))
    check_enough_tokens(n_cal + (bos is not None), cal.n_sequences * cal.seq_len, "calibration.text",
                        f"tokens of calibration.n_sequences × seq_len = {cal.n_sequences} × {cal.seq_len}")
    n_val = len(tokenize(tok, read_text(val.text, "validate.text")))
    check_enough_tokens(n_val + (bos is not None), val.ctx, "validate.text", "of one validate.ctx chunk")
    n = sum(p.numel() for p in model.parameters())
    line = (f"{params_file}: ok — {Path(params.model.path).name}, {n / 1e6:.1f} M parameters, all finite; "
            f"calibration {n_cal:,} tokens, evaluation {n_val:,} tokens")
    missing = unwritten_dvc_keys(params_file)  # fine for `haloquant run` and the flows, which know the defaults
    return line + (f"\nnote: dvc repro reads {', '.join(missing)} from this file, which does not write them out "
                   "(DVC does not know the spec's defaults): copy them from the repository's params.yaml"
                   if missing else "")
