"""The pipeline as a Prefect flow: one task per stage, cached on the stage's fingerprint.

The fingerprint (runner.fingerprint) hashes the spec sections a stage reads, its input files and
its code — the same things DVC tracks. A second run with nothing changed hits the cache for every
task; a budget edit changes allocate's fingerprint, and through its outputs everything after it.
Outputs changed or deleted behind the flow's back (a `dvc repro` with other params, `rm -r
artifacts`) are detected from the stage's record and the stage is recomputed.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import CachePolicy

from haloquant.artifacts import read_json, sha256_tree, write_json
from haloquant.runner import artifacts_root, describe, fingerprint, preflight
from schemas.params import load_params
from tasks import STAGE_BY_NAME, STAGES, Stage

RECORD_DIR = ".flow"  # under the artifacts root: what each stage last wrote, and for which key


def _record_path(root: Path, stage: Stage) -> Path:
    return root / RECORD_DIR / f"{stage.name}.json"


def _outputs(root: Path, stage: Stage) -> dict[str, str | None]:
    return {o: sha256_tree(root / o) if (root / o).exists() else None for o in stage.all_outs()}


def outputs_intact(root: Path, stage: Stage, key: str) -> bool:
    """True if the stage's outputs on disk are the ones it wrote for `key`."""
    rec = _record_path(root, stage)
    if not rec.is_file():
        return False
    record = read_json(rec)
    return record.get("key") == key and record.get("outputs") == _outputs(root, stage)


class StageFingerprint(CachePolicy):
    """Prefect cache key = the stage's fingerprint (spec sections + input hashes + code)."""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
        return inputs["key"]


@task(cache_policy=StageFingerprint(), persist_result=True, task_run_name="{name}")
def run_stage_task(name: str, params_file: str, key: str) -> str:
    params_path = Path(params_file)
    params = load_params(params_path)
    root = artifacts_root(params_path)
    stage = STAGE_BY_NAME[name]
    summary = describe(stage.run(params, root))
    write_json(_record_path(root, stage), {"key": key, "outputs": _outputs(root, stage)})
    return summary


@flow(name="haloquant", log_prints=True)
def haloquant_pipeline(params_file: str = "params.yaml") -> dict[str, dict]:
    """Run every stage; returns {stage: {"state": "Cached" | "Completed", "summary": ...}}."""
    params_path = Path(params_file).resolve()
    params = load_params(params_path)
    preflight(params)
    root = artifacts_root(params_path)
    logger = get_run_logger()
    results = {}
    for stage in STAGES:
        key = fingerprint(stage, params, root)  # computed after upstream stages have run
        task_fn = run_stage_task
        if not outputs_intact(root, stage, key):
            task_fn = run_stage_task.with_options(refresh_cache=True)
        state = task_fn(stage.name, str(params_path), key, return_state=True)
        results[stage.name] = {"state": state.name, "summary": state.result()}
        logger.info("%s [%s]: %s", stage.name, state.name, results[stage.name]["summary"])
    return results
