"""The pipeline as Prefect flows: one task per stage, cached on the stage's fingerprint.
`haloquant_pipeline` runs the main stages in order; `haloquant_sweep` maps the budget sweep;
`train_policy_flow` trains RAMP's SAC allocator on the model's measured sensitivity.

The fingerprint (runner.fingerprint) hashes the spec sections a stage reads, its input files and
its code — the same things DVC tracks. A second run with nothing changed hits the cache for every
task; a budget edit changes allocate's fingerprint, and through its outputs everything after it.
Outputs changed or deleted behind the flow's back (a `dvc repro` with other params, `rm -r
artifacts`) are detected from the stage's record and the stage is recomputed.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import CachePolicy
from prefect.task_runners import ThreadPoolTaskRunner

from haloquant.artifacts import read_json, sha256_tree, write_json
from haloquant.tasks.runner import artifacts_root, describe, fingerprint, preflight, timed
from haloquant.schemas.params import OrchestrationSpec, load_params
from haloquant.tasks import STAGES, TRAIN_POLICY, Stage, find_stage, sweep_stages

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
    """Prefect cache key = the stage's fingerprint (spec sections + input hashes + code + runtimes)."""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
        return inputs["key"]


@task(cache_policy=StageFingerprint(), persist_result=True, task_run_name="{name}")
def run_stage_task(name: str, params_file: str, key: str, torch_threads: int | None = None) -> str:
    """`torch_threads`: the flow process's torch thread count, for a task on a Dask worker. Float
    sums depend on it, and Dask starts workers with OMP_NUM_THREADS=1: without it a point computed
    there would not have the bytes the local runner (or dvc repro) computes."""
    if torch_threads:
        torch.set_num_threads(torch_threads)
    params_path = Path(params_file)
    params = load_params(params_path)
    root = artifacts_root(params_path)
    stage = find_stage(name, params)
    summary = describe(stage.name, timed(stage, params, root))
    write_json(_record_path(root, stage), {"key": key, "outputs": _outputs(root, stage)})
    return summary


@flow(name="haloquant", log_prints=True)
def haloquant_pipeline(params_file: str = "params.yaml") -> dict[str, dict]:
    """Run every stage; returns {stage: {"state": "Cached" | "Completed", "summary": ...}}."""
    return _run_in_order(Path(params_file).resolve(), STAGES)


def _run_in_order(params_path: Path, stages) -> dict[str, dict]:
    params = load_params(params_path)
    preflight(params)
    root = artifacts_root(params_path)
    logger = get_run_logger()
    results = {}
    for stage in stages:
        key = fingerprint(stage, params, root)  # computed after upstream stages have run
        task_fn = run_stage_task
        if not outputs_intact(root, stage, key):
            task_fn = run_stage_task.with_options(refresh_cache=True)
        state = task_fn(stage.name, str(params_path), key, return_state=True)
        results[stage.name] = {"state": state.name, "summary": state.result()}
        logger.info("%s [%s]: %s", stage.name, state.name, results[stage.name]["summary"])
    return results


def task_runner(spec: OrchestrationSpec):
    """The Prefect task runner of params.yaml's `orchestration` section.

    local: one point at a time — each point already uses every core, and transformers' model
    loading is not thread-safe (concurrent loads in threads fail on meta tensors). dask: one
    worker process per task slot (threads_per_worker=1), on a LocalCluster or the cluster at
    `address`; the workers must see the same paths (model, data, artifacts folder)."""
    if spec.runner == "local":
        return ThreadPoolTaskRunner(max_workers=1)
    from prefect_dask import DaskTaskRunner

    if spec.address:
        return DaskTaskRunner(address=spec.address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": spec.workers, "threads_per_worker": 1, "processes": True})


def local_cluster_environ():
    """A context in which a Dask LocalCluster leaves this process's environment alone: its nannies
    otherwise write OMP/MKL/OPENBLAS_NUM_THREADS=1 into os.environ (for their workers, but for good),
    and every later subprocess of this process (`haloquant stage`, dvc) would compute on one thread,
    so with other float sums. Tasks set their own torch thread count (run_stage_task)."""
    import dask

    return dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": None
                            for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})


@flow(name="haloquant-sweep", log_prints=True)
def haloquant_sweep(params_file: str = "params.yaml") -> dict[str, dict]:
    """calibrate and sensitivity (cached, shared with the main flow), then every sweep budget and
    llama.cpp preset as mapped tasks on `orchestration`'s runner, then the Pareto plot."""
    params_path = Path(params_file).resolve()
    results = _run_in_order(params_path, STAGES[:2])
    params = load_params(params_path)
    root = artifacts_root(params_path)
    *points, pareto_stage = sweep_stages(params)
    todo = [s for s in points if not outputs_intact(root, s, fingerprint(s, params, root))]
    # nothing to compute: no cluster to start (a LocalCluster's workers take a while to import torch)
    runner = task_runner(params.orchestration) if todo else ThreadPoolTaskRunner(max_workers=1)
    with local_cluster_environ() if params.orchestration.runner == "dask" and todo else nullcontext():
        results.update(sweep_points.with_options(task_runner=runner)(str(params_path)))
    results.update(_run_in_order(params_path, [pareto_stage]))
    return results


@flow(name="haloquant-sweep-points", log_prints=True)
def sweep_points(params_file: str) -> dict[str, dict]:
    """The sweep's points and presets, mapped: a point intact on disk for its fingerprint is a cache
    hit; the others run (a task that raises is retried `orchestration.retries` times)."""
    params_path = Path(params_file)
    params = load_params(params_path)
    root = artifacts_root(params_path)
    *points, _ = sweep_stages(params)
    keys = {s.name: fingerprint(s, params, root) for s in points}
    stage_task = run_stage_task.with_options(retries=params.orchestration.retries)
    threads = unmapped(torch.get_num_threads())
    futures = []
    for refresh in (False, True):  # one map for points still intact on disk, one for those to refresh
        names = [s.name for s in points if outputs_intact(root, s, keys[s.name]) != refresh]
        if names:
            fn = stage_task.with_options(refresh_cache=True) if refresh else stage_task
            futures += zip(names, fn.map(names, unmapped(str(params_path)), [keys[n] for n in names], threads))
    results = {}
    for name, fut in futures:
        fut.wait()
        results[name] = {"state": fut.state.name, "summary": fut.result()}
    return results


@flow(name="train-policy", log_prints=True)
def train_policy_flow(params_file: str = "params.yaml") -> dict[str, dict]:
    """calibrate and sensitivity (cached, shared with the main flow), then train_policy: a policy
    folder under artifacts/train_policy for `allocation.solver: sac`."""
    return _run_in_order(Path(params_file).resolve(), STAGES[:2] + (TRAIN_POLICY,))
