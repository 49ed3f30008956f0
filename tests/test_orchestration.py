"""The sweep on a Dask cluster (params.yaml `orchestration`): the same bytes as the local runner,
also when a worker process is killed in the middle of a task."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import pytest

from tests.conftest import small_params, write_params
from tests.test_reproducible import artifact_hashes

SWEEP = {"bits_per_weight": [4.75, 5.5], "presets": ["Q4_K_M"], "max_chunks": 2}


def _sweep(folder, orchestration: dict, reuse=None) -> dict:
    """The sweep flow in `folder`; `reuse`: a folder whose calibrate and sensitivity (and the flow's
    records of them) are copied in first, so only the mapped points run again."""
    from haloquant.flows.pipeline import RECORD_DIR, haloquant_sweep

    if reuse is not None:
        for stage in ("calibrate", "sensitivity"):
            shutil.copytree(reuse / "artifacts" / stage, folder / "artifacts" / stage)
            (folder / "artifacts" / RECORD_DIR).mkdir(parents=True, exist_ok=True)
            shutil.copy(reuse / "artifacts" / RECORD_DIR / f"{stage}.json", folder / "artifacts" / RECORD_DIR)
    params = small_params(sweep=SWEEP)
    params["orchestration"] = orchestration
    results = haloquant_sweep(str(write_params(folder, params)))
    # a LocalCluster's nannies must not leave OMP_NUM_THREADS=1 for this process's later subprocesses
    assert not {"OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"} & set(os.environ)
    points = {k: r["state"] for k, r in results.items() if k.startswith(("sweep@", "preset@"))}
    assert set(points.values()) == {"Completed"} and len(points) == 3, results  # computed, not cached
    return artifact_hashes(folder / "artifacts")


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    folder = tmp_path_factory.mktemp("local")
    return folder, _sweep(folder, {"runner": "local"})


@pytest.mark.slow
def test_dask_local_cluster_gives_the_local_runners_bytes(local_sweep, tmp_path):
    folder, local = local_sweep
    on_dask = _sweep(tmp_path, {"runner": "dask", "workers": 2}, reuse=folder)
    assert {"sweep/bpw-4.75/export_gguf/model.gguf", "sweep/preset-Q4_K_M/point.json",
            "pareto/pareto.json"} <= set(on_dask)
    assert on_dask == local, {k for k in on_dask if on_dask[k] != local.get(k)}


@pytest.mark.slow
def test_a_worker_killed_mid_task_is_survived_with_the_same_bytes(local_sweep, tmp_path):
    """SIGKILL of the worker process running a sweep point, a few seconds into the task: Dask
    re-runs the task on a worker that lives (the nanny restarts the dead one); the flow completes and
    every artifact is the local runner's."""
    from distributed import Client, LocalCluster

    from haloquant.flows.pipeline import local_cluster_environ

    folder, local = local_sweep
    killed: list[str] = []
    with local_cluster_environ(), LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        def kill_one_busy_worker():
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and not killed:
                busy = [w for w, tasks in client.processing().items() if tasks]
                if busy:
                    time.sleep(4)  # into the task: the worker is importing, loading or quantizing
                    pids = client.run(os.getpid, workers=busy[:1])
                    for worker, pid in pids.items():
                        os.kill(pid, signal.SIGKILL)
                        killed.append(worker)
                time.sleep(0.2)

        killer = threading.Thread(target=kill_one_busy_worker, daemon=True)
        killer.start()
        on_dask = _sweep(tmp_path, {"runner": "dask", "address": cluster.scheduler_address}, reuse=folder)
        killer.join(timeout=5)
    assert killed, "no worker was ever busy: nothing was tested"
    assert on_dask == local, {k for k in on_dask if on_dask[k] != local.get(k)}
