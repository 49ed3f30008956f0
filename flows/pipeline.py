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

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import CachePolicy
from prefect.task_runners import ThreadPoolTaskRunner

from haloquant import HaloquantError
from haloquant.artifacts import read_json, sha256_json, sha256_tree, write_json
from haloquant.schemas.fleet import Fleet, load_fleet
from haloquant.schemas.params import OrchestrationSpec, load_params
from haloquant.tasks import SHARED_STAGES, STAGES, TRAIN_POLICY, Stage, find_stage, sweep_stages
from haloquant.tasks.fleet import preflight_fleet
from haloquant.tasks.fleet_report import report_fleet
from haloquant.tasks.runner import (artifacts_root, fingerprint, fingerprint_parts, preflight, timed_line,
                                    what_changed)

RECORD_DIR = ".flow"  # under the artifacts root: what each stage last wrote, and for which key
LAST_RUN_FILE = "last_run.json"  # in RECORD_DIR: what the last flow redid, and why


def _record_path(root: Path, stage: Stage) -> Path:
    return root / RECORD_DIR / f"{stage.name}.json"


def _outputs(root: Path, stage: Stage) -> dict[str, str | None]:
    return {o: sha256_tree(root / o) if (root / o).exists() else None for o in stage.all_outs()}


def rerun_reason(root: Path, stage: Stage, key: str, parts: dict | None = None) -> str | None:
    """None if the stage's outputs on disk are the ones it wrote for `key`; otherwise why it must run."""
    rec = _record_path(root, stage)
    if not rec.is_file():
        return "not run here before"
    record = read_json(rec)
    if record.get("key") == key:
        outputs = _outputs(root, stage)
        changed = [o for o, h in outputs.items() if record.get("outputs", {}).get(o) != h]
        return f"outputs changed or removed: {', '.join(changed)}" if changed else None
    if parts is None or "parts" not in record:
        return "inputs changed"
    return "changed: " + (", ".join(what_changed(record["parts"], parts)) or "the stage's identity")


def outputs_intact(root: Path, stage: Stage, key: str) -> bool:
    """True if the stage's outputs on disk are the ones it wrote for `key`."""
    return rerun_reason(root, stage, key) is None


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
    stage = find_stage(name, params)
    return timed_line(stage, params, artifacts_root(params_path))[1]


@dataclass(frozen=True)
class Job:
    """One stage of one params file: what a wave submits."""

    label: str  # the stage's name, or member/stage in a fleet
    params_path: Path
    stage: Stage

    @property
    def root(self) -> Path:
        return artifacts_root(self.params_path)


def _not_bad_input(task, task_run, state) -> bool:
    """Retry a task unless it failed on bad input (a HaloquantError names what to fix: the same
    input fails the same way again)."""
    try:
        state.result()
    except HaloquantError:
        return False
    except BaseException:  # noqa: BLE001 — any other failure (a dead worker, a crash) may pass on a retry
        return True
    return True


def run_wave(jobs: list[Job], retries: int = 0) -> dict[str, dict]:
    """Submit independent jobs to the flow's task runner, wait for all, record what each wrote.

    A job whose outputs are intact for its fingerprint is a cache hit; the others run with the
    cache refreshed and say why (what changed since their record). Fingerprints are computed here,
    after every earlier wave has finished, since they hash the files those waves wrote."""
    threads = torch.get_num_threads()
    submitted = []
    for job in jobs:
        params = load_params(job.params_path)
        parts = fingerprint_parts(job.stage, params, job.root)
        key = sha256_json(parts)
        why = rerun_reason(job.root, job.stage, key, parts)
        fn = run_stage_task.with_options(retries=retries, retry_condition_fn=_not_bad_input,
                                         refresh_cache=why is not None, task_run_name=job.label)
        submitted.append((job, key, parts, why, fn.submit(job.stage.name, str(job.params_path), key, threads)))
    results = {}
    for job, key, parts, why, future in submitted:
        summary = future.result()  # raises the task's error
        state = future.state.name
        if state != "Cached":
            why = why or "no result in Prefect's cache"
            write_json(_record_path(job.root, job.stage),
                       {"key": key, "parts": parts, "outputs": _outputs(job.root, job.stage)})
        results[job.label] = {"state": state, "summary": summary, "why": why if state != "Cached" else None}
    return results


def report_last_run(folder: Path, results: dict[str, dict]) -> dict:
    """`.flow/last_run.json` under `folder` and one log line: which stages ran again and why."""
    redid = {k: r["why"] for k, r in results.items() if r["state"] != "Cached"}
    report = {"redid": redid, "cached": [k for k, r in results.items() if r["state"] == "Cached"]}
    write_json(folder / RECORD_DIR / LAST_RUN_FILE, report)
    logger = get_run_logger()
    if redid:
        logger.info("redid %d of %d stages: %s", len(redid), len(results),
                    "; ".join(f"{k} ({why})" for k, why in redid.items()))
    else:
        logger.info("nothing changed: all %d stages cached", len(results))
    return report


@flow(name="haloquant", log_prints=True)
def haloquant_pipeline(params_file: str = "params.yaml") -> dict[str, dict]:
    """Run every stage; returns {stage: {"state": "Cached" | "Completed", "summary": ..., "why": ...}}
    and writes artifacts/.flow/last_run.json (what was redone, and why)."""
    params_path = Path(params_file).resolve()
    results = _run_in_order(params_path, STAGES)
    report_last_run(artifacts_root(params_path), results)
    return results


def _run_in_order(params_path: Path, stages) -> dict[str, dict]:
    preflight(load_params(params_path))
    logger = get_run_logger()
    results = {}
    for stage in stages:
        results.update(run_wave([Job(stage.name, params_path, stage)]))
        r = results[stage.name]
        if r["state"] == "Cached":  # a stage that ran logged its own line (haloquant.stages)
            logger.info("%s [Cached]: %s", stage.name, r["summary"])
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
    import distributed  # noqa: F401 — loads its config defaults first: leaving the `set` context deletes
    # the keys it added, and had "distributed" been absent then, all of distributed's defaults with them

    return dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": None
                            for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})


@flow(name="haloquant-sweep", log_prints=True)
def haloquant_sweep(params_file: str = "params.yaml") -> dict[str, dict]:
    """plan_widening, rotate, calibrate and sensitivity (cached, shared with the main flow), then every sweep
    budget and llama.cpp preset as mapped tasks on `orchestration`'s runner, then the Pareto plot."""
    params_path = Path(params_file).resolve()
    results = _run_in_order(params_path, SHARED_STAGES)
    params = load_params(params_path)
    root = artifacts_root(params_path)
    *points, pareto_stage = sweep_stages(params)
    todo = [s for s in points if not outputs_intact(root, s, fingerprint(s, params, root))]
    with _runner(params.orchestration, bool(todo)) as runner:
        results.update(sweep_points.with_options(task_runner=runner)(str(params_path)))
    results.update(_run_in_order(params_path, [pareto_stage]))
    report_last_run(root, results)
    return results


@contextmanager
def _runner(spec: OrchestrationSpec, needed: bool):
    """The task runner to map on; with nothing to compute, no cluster is started (a LocalCluster's
    workers take a while to import torch)."""
    if not needed:
        yield ThreadPoolTaskRunner(max_workers=1)
        return
    with local_cluster_environ() if spec.runner == "dask" else nullcontext():
        yield task_runner(spec)


@flow(name="haloquant-sweep-points", log_prints=True)
def sweep_points(params_file: str) -> dict[str, dict]:
    """The sweep's points and presets, mapped: a point intact on disk for its fingerprint is a cache
    hit; the others run (a task that raises is retried `orchestration.retries` times)."""
    params_path = Path(params_file)
    params = load_params(params_path)
    *points, _ = sweep_stages(params)
    return run_wave([Job(s.name, params_path, s) for s in points], retries=params.orchestration.retries)


# ---------------------------------------------------------------------------------------- fleets

@flow(name="haloquant-fleet", log_prints=True)
def haloquant_fleet(fleet_file: str = "fleet.yaml") -> dict[str, dict]:
    """Every member of a fleet (fleet.yaml): its pipeline, its sweep and presets, its Pareto plot,
    as tasks on the fleet's `orchestration` runner, members side by side; then the cross-model
    report. Results are keyed member/stage; the fleet's artifacts/.flow/last_run.json says what was
    redone and why."""
    fleet = load_fleet(fleet_file)
    preflight_fleet(fleet)
    jobs = _fleet_waves(fleet)
    todo = any(not outputs_intact(j.root, j.stage, fingerprint(j.stage, load_params(j.params_path), j.root))
               for wave in jobs for j in wave)
    with _runner(fleet.spec.orchestration, todo) as runner:
        results = fleet_stages.with_options(task_runner=runner)(str(fleet.path))
    report = report_fleet(fleet)
    get_run_logger().info("fleet report: %s (%d members)", fleet.report_dir, len(report.members))
    report_last_run(fleet.folder / "artifacts", results)
    return results


def _fleet_waves(fleet: Fleet) -> list[list[Job]]:
    """Stage by stage, every member's job in one wave: a wave's stages are independent, and each
    depends only on earlier waves (a member's own earlier stages)."""
    files = {n: fleet.params_file(n) for n in fleet.members}
    waves = [[Job(f"{n}/{s.name}", files[n], s) for n in fleet.members] for s in STAGES]
    sweeps = {n: sweep_stages(p) for n, p in fleet.members.items()}
    waves.append([Job(f"{n}/{s.name}", files[n], s) for n, stages in sweeps.items() for s in stages[:-1]])
    waves.append([Job(f"{n}/{stages[-1].name}", files[n], stages[-1]) for n, stages in sweeps.items()])
    return waves


@flow(name="haloquant-fleet-stages", log_prints=True)
def fleet_stages(fleet_file: str) -> dict[str, dict]:
    fleet = load_fleet(fleet_file)
    results = {}
    for wave in _fleet_waves(fleet):
        results.update(run_wave(wave, retries=fleet.spec.orchestration.retries))
    return results


@flow(name="train-policy", log_prints=True)
def train_policy_flow(params_file: str = "params.yaml") -> dict[str, dict]:
    """plan_widening, rotate, calibrate and sensitivity (cached, shared with the main flow), then train_policy:
    a policy folder under artifacts/train_policy for `allocation.solver: sac`."""
    return _run_in_order(Path(params_file).resolve(), SHARED_STAGES + (TRAIN_POLICY,))
