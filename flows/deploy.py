"""A scheduled deployment of the pipeline, served by this process against a Prefect server.

    prefect server start                      # terminal 1 (SQLite database under ~/.prefect)
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    haloquant serve --cron "0 3 * * *"        # terminal 2: registers and runs the deployment
    prefect deployment run haloquant/haloquant-scheduled   # optional: run now
    haloquant fleet serve fleets/example/fleet.yaml         # or: every member of a fleet

Each scheduled run recomputes exactly the stages whose inputs changed (a new checkpoint in a model
folder, new calibration text, an edited params.yaml) and logs, and writes to
artifacts/.flow/last_run.json, what it redid and why.
"""

from __future__ import annotations

from pathlib import Path

from haloquant.flows.pipeline import haloquant_fleet, haloquant_pipeline

DEPLOYMENT_NAME = "haloquant-scheduled"
FLEET_DEPLOYMENT_NAME = "haloquant-fleet-scheduled"


def build_deployment(params_file: str, cron: str):
    return haloquant_pipeline.to_deployment(
        name=DEPLOYMENT_NAME, cron=cron, parameters={"params_file": str(Path(params_file).resolve())},
        description="Re-quantize and re-validate the model in params.yaml on a schedule (cached per stage).",
    )


def serve(params_file: str, cron: str) -> None:
    from prefect import serve as prefect_serve

    prefect_serve(build_deployment(params_file, cron))


def build_fleet_deployment(fleet_file: str, cron: str):
    return haloquant_fleet.to_deployment(
        name=FLEET_DEPLOYMENT_NAME, cron=cron, parameters={"fleet_file": str(Path(fleet_file).resolve())},
        description="Re-quantize every member of the fleet whose inputs changed, then the cross-model report.",
    )


def serve_fleet(fleet_file: str, cron: str) -> None:
    from prefect import serve as prefect_serve

    prefect_serve(build_fleet_deployment(fleet_file, cron))
