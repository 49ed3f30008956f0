"""Caching: `dvc repro` and the Prefect flow re-run exactly the stages whose inputs changed."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_project, small_params, write_params

STAGES = ["plan_widening", "rotate", "calibrate", "sensitivity", "allocate", "scale_fold", "quantize", "export_gguf",
          "export_onnx", "validate"]


def sh(cmd, cwd):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(cmd, cwd=cwd, shell=True, capture_output=True, text=True, env=env)
    assert r.returncode == 0, f"{cmd}\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def ran(output: str) -> list[str]:
    """Stages dvc repro ran, but `environment` (always run: it records the runtimes' versions)."""
    return [s for s in re.findall(r"Running stage '([\w@.]+)'", output) if s != "environment"]


def changed(status: str) -> set[str]:
    """Stages `dvc status` lists as changed."""
    return {m for m in re.findall(r"^([\w@.]+):", status, re.M)} - {"environment"}


@pytest.mark.slow
def test_dvc_repro_caching(tmp_path):
    proj = copy_project(tmp_path / "proj")
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["calibration"]["n_sequences"] = 8
    params["validate"].update(max_chunks=2, ctx=256)
    params["sweep"] = {"bits_per_weight": [4.0], "presets": ["Q4_K_M"], "max_chunks": 1}
    params["train_policy"].update(timesteps=1100, eval_every=550)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git init -q && git add -A && git -c user.email=t@t -c user.name=t commit -qm init && dvc init -q", proj)

    first = sh("dvc repro", proj)
    assert [s for s in ran(first) if s in STAGES] == STAGES
    assert {"sweep@4.0", "preset@Q4_K_M", "pareto", "train_policy"} <= set(ran(first))
    second = sh("dvc repro", proj)
    assert ran(second) == [] and "Stage 'calibrate' didn't change" in second

    # code dependencies are derived from what each stage runs: an edit to tasks/quantize.py reaches
    # quantize and every sweep point and preset (they quantize too), not calibrate; one to
    # tasks/allocate.py reaches train_policy (it solves the MILP) and the sweep module's stages; cli.py none
    for edited, expected in (("tasks/quantize.py", {"quantize", "sweep@4.0", "preset@Q4_K_M"}),
                             ("tasks/allocate.py", {"allocate", "sweep@4.0", "preset@Q4_K_M", "train_policy"}),
                             ("flows/cli.py", set())):
        original = (proj / edited).read_text()
        (proj / edited).write_text(original + "\n# an edit\n")
        assert changed(sh("dvc status", proj)) == expected, edited
        (proj / edited).write_text(original)

    params["allocation"]["budget"]["bits_per_weight"] = 4.75
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = sh("dvc repro", proj)
    # plan_widening re-decides whether to widen (the budget may need it); its decision stands, so rotate,
    # calibrate and sensitivity are not re-run. The sweep has its own budgets: untouched
    assert ran(third) == ["plan_widening"] + STAGES[4:]
    assert all(f"Stage '{s}' didn't change" in third for s in ("rotate", "calibrate", "sensitivity"))

    metrics = sh("dvc metrics show --json", proj)
    assert "ppl_quant" in metrics and "llama_cpp_ppl_gap" in metrics
    plots = sh("dvc plots show --json", proj)
    assert "bits_per_layer.json" in plots and "size_ppl.json" in plots and "pareto.json" in plots
    assert "learning_curve.json" in plots

    # a rotation seed while rotation is off: rotate re-runs, writes the same record, and nothing after it runs
    params["rotate"]["seed"] = 1
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran(sh("dvc repro", proj)) == ["rotate"]

    params["sweep"]["bits_per_weight"] = [4.0, 5.0]  # one more point: only it and the plot run
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    fourth = sh("dvc repro", proj)
    assert ran(fourth) == ["sweep@5.0", "pareto"]


def flow_run_logs(flow_run_id) -> list[tuple[str, str]]:
    """(logger name, message) of every log line the Prefect API holds for the flow run."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()

    async def read():
        async with get_client() as client:
            return await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))

    return [(log.name, log.message) for log in asyncio.run(read())]


@pytest.mark.slow
def test_prefect_flow_caching(tmp_path, monkeypatch):
    from haloquant.flows.pipeline import haloquant_pipeline

    monkeypatch.setenv("HALOQUANT_PROGRESS_EVERY_S", "0")  # a progress line per item
    params_file = write_params(tmp_path, small_params())
    states = lambda: {k: v["state"] for k, v in haloquant_pipeline(str(params_file)).items()}  # noqa: E731
    first = haloquant_pipeline(str(params_file), return_state=True)
    assert {v["state"] for v in first.result().values()} == {"Completed"}
    # the stages' progress and summary lines are in the flow run's logs, as Prefect's own are
    logs = flow_run_logs(first.state_details.flow_run_id)
    assert any(n == "haloquant.stages" and m.startswith("sensitivity: 29 tensors") and " written in " in m
               for n, m in logs), logs
    assert any(n == "haloquant.progress" and m.startswith("sensitivity: 1/29 tensors (3 %)") for n, m in logs)
    assert any(n == "haloquant.progress" and m.startswith("sensitivity: 29/29 tensors (100 %), ") for n, m in logs)
    assert set(states().values()) == {"Cached"}

    write_params(tmp_path, small_params(**{"allocation.budget": {"bits_per_weight": 4.75}}))
    after_edit = states()
    assert after_edit["plan_widening"] == "Completed"  # it re-decides rotate.widen: auto against the new budget
    assert [s for s in STAGES if after_edit[s] == "Cached"] == ["rotate", "calibrate", "sensitivity"]

    # outputs deleted behind the flow's back are recomputed, not served stale from the cache
    (tmp_path / "artifacts" / "export_gguf" / "model.gguf").unlink()
    after_delete = states()
    assert after_delete["export_gguf"] == "Completed" and after_delete["quantize"] == "Cached"
    assert (tmp_path / "artifacts" / "export_gguf" / "model.gguf").is_file()


@pytest.mark.slow
def test_prefect_sweep_flow_maps_points(tmp_path):
    from haloquant.flows.pipeline import haloquant_sweep

    params_file = write_params(tmp_path, small_params(sweep={"bits_per_weight": [4.75, 5.5], "presets": ["Q4_K_M"],
                                                             "max_chunks": 1}))
    first = {k: v["state"] for k, v in haloquant_sweep(str(params_file)).items()}
    assert set(first) == {"plan_widening", "rotate", "calibrate", "sensitivity", "sweep@4.75", "sweep@5.5",
                          "preset@Q4_K_M", "pareto"}
    assert set(first.values()) == {"Completed"}
    second = {k: v["state"] for k, v in haloquant_sweep(str(params_file)).items()}
    assert set(second.values()) == {"Cached"}
    assert len(yaml.safe_load((tmp_path / "artifacts" / "pareto" / "pareto.json").read_text())) == 3


def test_deployment_has_cron_schedule(tmp_path):
    from haloquant.flows.deploy import DEPLOYMENT_NAME, build_deployment

    params_file = write_params(tmp_path, small_params())
    dep = build_deployment(str(params_file), "0 3 * * *")
    assert dep.name == DEPLOYMENT_NAME
    assert dep.parameters == {"params_file": str(params_file.resolve())}
    assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * *"]


@pytest.mark.slow
def test_train_policy_flow_then_sac_allocation(tmp_path):
    """The train-policy flow writes a policy folder (cached on a second run); the pipeline then
    allocates with it (`allocation.solver: sac`, `allocation.policy: artifacts/train_policy`)."""
    from haloquant.flows.pipeline import haloquant_pipeline, train_policy_flow

    params_file = write_params(tmp_path, small_params(**{"train_policy": {"timesteps": 1100, "eval_every": 550}}))
    first = {k: v["state"] for k, v in train_policy_flow(str(params_file)).items()}
    assert first == {"plan_widening": "Completed", "rotate": "Completed", "calibrate": "Completed",
                     "sensitivity": "Completed", "train_policy": "Completed"}
    assert (tmp_path / "artifacts" / "train_policy" / "policy.zip").is_file()
    second = {k: v["state"] for k, v in train_policy_flow(str(params_file)).items()}
    assert set(second.values()) == {"Cached"}

    write_params(tmp_path, small_params(**{"allocation.solver": "sac", "allocation.policy": "artifacts/train_policy"}))
    states = {k: v["state"] for k, v in haloquant_pipeline(str(params_file)).items()}
    assert states["calibrate"] == states["sensitivity"] == "Cached" and states["validate"] == "Completed"
    alloc = yaml.safe_load((tmp_path / "artifacts" / "allocate" / "allocation.json").read_text())
    assert alloc["solver"] == "sac" and alloc["used_bytes"] <= alloc["budget_bytes"]


def test_a_file_hash_is_remembered_only_while_the_file_is_unchanged(tmp_path, monkeypatch):
    """sha256_file reads a settled file once per process; a rewrite of the same size with its old
    mtime put back is still seen (its ctime moved), and a file written just now is read every time."""
    import builtins
    import hashlib

    from haloquant import artifacts

    f = tmp_path / "weights.bin"
    f.write_bytes(b"a" * 4096)
    assert artifacts.sha256_file(f) == hashlib.sha256(b"a" * 4096).hexdigest()
    assert not any(k[0] == os.path.realpath(f) for k in artifacts._HASHES)  # written just now: not kept

    monkeypatch.setattr(artifacts, "_SETTLED_S", -1.0)  # as if every file had settled
    first = artifacts.sha256_file(f)
    real_open = builtins.open
    with monkeypatch.context() as m:
        m.setattr(builtins, "open", lambda p, *a, **k: (_ for _ in ()).throw(AssertionError("read again"))
                  if Path(p) == f else real_open(p, *a, **k))
        assert artifacts.sha256_file(f) == first  # remembered, not read
    st = f.stat()
    f.write_bytes(b"b" * 4096)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime
    assert artifacts.sha256_file(f) == hashlib.sha256(b"b" * 4096).hexdigest()
