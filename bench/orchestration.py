"""Issue 17's bench: the sweep's wall time, Prefect's local runner vs a Dask LocalCluster.

    python bench/orchestration.py [--model data/models/ref-llama-tiny] [--workers 2 4 …]

The repository's params.yaml (its sweep: 5 budgets and 3 llama.cpp presets), only model.path and
orchestration changed; each runner in its own fresh folder, so every point is computed; the
calibration and sensitivity stages (run in the flow's own process either way) are timed apart from
the mapped points. Then the artifacts of the two folders are compared byte for byte.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

from common import REPO  # noqa: E402  (bench/ is on sys.path when run as a script)

sys.path.insert(0, str(REPO))  # tests.test_reproducible: the byte comparison the tests use


def run(folder: Path, model: Path, orchestration: dict) -> dict:
    from haloquant.flows.pipeline import haloquant_sweep

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["path"] = str(model.resolve())
    for section in ("calibration", "validate"):
        params[section]["text"] = str(REPO / params[section]["text"])
    params["allocation"]["policy"] = str(REPO / params["allocation"]["policy"])
    params["orchestration"] = orchestration
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    t0 = time.perf_counter()
    results = haloquant_sweep(str(folder / "params.yaml"))
    total = time.perf_counter() - t0
    timing = {p.stem: json.loads(p.read_text())["seconds"] for p in (folder / "artifacts" / ".timing").glob("*.json")}
    return {"total": total, "states": {k: v["state"] for k, v in results.items()}, "timing": timing}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=REPO / "data" / "models" / "ref-llama-tiny")
    ap.add_argument("--workers", type=int, nargs="+", default=[2], help="one Dask row per worker count")
    ap.add_argument("--out", type=Path, default=Path("/tmp/haloquant-orchestration"))
    args = ap.parse_args()
    from tests.test_reproducible import artifact_hashes

    import torch

    rows, folders = {}, {}
    for name, orch in [("local", {"runner": "local"})] + [
            (f"dask ×{n}", {"runner": "dask", "workers": n}) for n in args.workers]:
        folders[name] = folder = args.out / name.replace(" ×", "-")
        if folder.exists():
            raise SystemExit(f"{folder} exists: remove it, every point must be computed")
        rows[name] = run(folder, args.model, orch)
        print(name, rows[name], flush=True)
    hashes = {name: artifact_hashes(f / "artifacts") for name, f in folders.items()}
    local = hashes["local"]
    print(f"\n{args.model.name}, params.yaml's sweep (5 budgets, 3 presets), {os.cpu_count()} CPUs, torch "
          f"{torch.get_num_threads()} threads per task; {len(local)} artifact files\n")
    print("| runner | calibrate + sensitivity (s) | sweep points + pareto (s) | flow total (s) | artifacts = local's |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        pre = sum(v for k, v in r["timing"].items() if k in ("calibrate", "sensitivity"))
        print(f"| {name} | {pre:.0f} | {r['total'] - pre:.0f} | {r['total']:.0f} | {hashes[name] == local} |")
    differ = {n: sorted(k for k in local if h.get(k) != local[k]) for n, h in hashes.items() if h != local}
    if differ:
        sys.exit(f"artifacts differ: {differ}")


if __name__ == "__main__":
    main()
