"""Fleets (fleet.yaml): two models run as one Prefect flow and as one `dvc repro`; an edit to one
member re-runs that member's stages only, and the flow says what it redid and why."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import CALIB_TEXT, REPO, copy_project, small_params, write_params
from tests.modelzoo import CASES, make_model
from tests.test_caching import STAGES, sh

QWEN = next(c for c in CASES if c.family == "qwen2" and not c.tied)  # width 256, qkv biases
MEMBER_SWEEPS = {"tiny": {"bits_per_weight": [4.75], "presets": ["Q4_K_M"], "max_chunks": 1},
                 "qwen": {"bits_per_weight": [5.5], "presets": [], "max_chunks": 1}}


def ran(output: str) -> list[str]:
    """Stages `dvc repro` ran, as dvc names them (fleet/tiny/dvc.yaml:calibrate), but the always-run
    environment stages."""
    return [s for s in re.findall(r"Running stage '([\w@./:-]+)'", output) if not s.endswith(":environment")]


def make_fleet(folder, models: dict, project=REPO) -> Path:
    """fleet.yaml in `folder` with one member folder per model: the repository's params.yaml made
    small (every key written, as DVC needs), paths relative as a user writes them."""
    import os

    for name, model in models.items():
        p = yaml.safe_load((REPO / "params.yaml").read_text())
        small = small_params(sweep=MEMBER_SWEEPS[name])
        for section in ("calibration", "sensitivity", "allocation", "sweep"):
            p[section].update(small[section])
        p["validate"].update(small["validate"], runtimes=["llama_cpp"])
        rel = lambda x: os.path.relpath(x, folder / name)  # noqa: E731
        p["model"].update(path=rel(model), device="cpu", add_bos=True if name == "tiny" else None)  # tiny: BOS-trained
        p["calibration"]["text"], p["validate"]["text"] = rel(small["calibration"]["text"]), rel(small["validate"]["text"])
        p["allocation"]["policy"] = rel(project / "policies" / "sac-llama-family")
        del p["orchestration"]
        write_params(folder / name, p)
    fleet = {"members": {n: f"{n}/params.yaml" for n in models}, "orchestration": {"runner": "local"}}
    return write_params(folder, fleet, "fleet.yaml")


def set_budget(fleet_file, member: str, bpw: float) -> None:
    path = fleet_file.parent / member / "params.yaml"
    p = yaml.safe_load(path.read_text())
    p["allocation"]["budget"] = {"bits_per_weight": bpw}
    path.write_text(yaml.safe_dump(p, sort_keys=False))


def member_stages(member: str, sweep: dict) -> list[str]:
    points = [f"sweep@{b}" for b in sweep["bits_per_weight"]] + [f"preset@{x}" for x in sweep["presets"]]
    return [f"{member}/{s}" for s in STAGES + points + ["pareto"]]


@pytest.mark.slow
def test_a_fleet_of_two_models_as_one_flow(tmp_path):
    from haloquant.artifacts import read_json
    from haloquant.flows.pipeline import LAST_RUN_FILE, RECORD_DIR, haloquant_fleet

    models = {"tiny": tmp_path / "models" / "ref-llama-tiny", "qwen": make_model(QWEN, tmp_path / "models")}
    shutil.copytree(REPO / "data" / "models" / "ref-llama-tiny", models["tiny"])
    fleet = make_fleet(tmp_path / "fleet", models)
    calibration = tmp_path / "calibration.txt"  # the qwen member's own calibration text, edited below
    shutil.copy(CALIB_TEXT, calibration)
    qwen_params = yaml.safe_load((fleet.parent / "qwen" / "params.yaml").read_text())
    qwen_params["calibration"]["text"] = str(calibration)
    write_params(fleet.parent / "qwen", qwen_params)
    last_run = lambda: read_json(fleet.parent / "artifacts" / RECORD_DIR / LAST_RUN_FILE)  # noqa: E731

    first = haloquant_fleet(str(fleet))
    expected = member_stages("tiny", MEMBER_SWEEPS["tiny"]) + member_stages("qwen", MEMBER_SWEEPS["qwen"])
    assert sorted(first) == sorted(expected)
    assert {r["state"] for r in first.values()} == {"Completed"}
    assert set(last_run()["redid"].values()) == {"not run here before"}
    report = read_json(fleet.parent / "artifacts" / "fleet" / "report.json")
    assert report["members"]["qwen"]["model"] == QWEN.id and report["members"]["tiny"]["model"] == "ref-llama-tiny"
    assert [p["label"] for p in report["members"]["tiny"]["points"]] == ["4.75 bpw", "Q4_K_M"]
    plot = read_json(fleet.parent / "artifacts" / "fleet" / "pareto.json")
    assert {r["series"] for r in plot} == {"tiny: haloquant", "tiny: llama.cpp+imatrix", "qwen: haloquant"}
    assert "| qwen |" in (fleet.parent / "artifacts" / "fleet" / "report.md").read_text()

    again = haloquant_fleet(str(fleet))
    assert {r["state"] for r in again.values()} == {"Cached"} and last_run()["redid"] == {}

    # one member's budget: that member's widening decision (which stands: its rotate stays cached) and allocate
    # and what follows, nothing of the other member, and not its sweep (the sweep's points have their own budgets)
    set_budget(fleet, "qwen", 4.75)
    edited = haloquant_fleet(str(fleet))
    redid = last_run()["redid"]
    assert sorted(redid) == sorted(f"qwen/{s}" for s in ["plan_widening"] + STAGES[4:])
    assert redid["qwen/plan_widening"] == "changed: spec allocation.budget"
    assert redid["qwen/allocate"] == "changed: spec allocation"
    assert redid["qwen/scale_fold"] == "changed: input allocate/allocation.json"
    assert all(edited[k]["state"] == "Cached" for k in edited if k not in redid)

    # a new checkpoint in a model folder: every stage of that member, the sweep included
    with open(models["tiny"] / "model.safetensors", "r+b") as f:  # one weight byte changed
        f.seek(-3, 2)
        b = f.read(1)
        f.seek(-3, 2)
        f.write(bytes([b[0] ^ 1]))
    haloquant_fleet(str(fleet))
    redid = last_run()["redid"]
    assert sorted(redid) == sorted(member_stages("tiny", MEMBER_SWEEPS["tiny"]))
    assert redid["tiny/calibrate"] == "changed: input model.path"

    # new calibration text: the qwen member's calibrate and everything after it, the sweep included
    calibration.write_text(calibration.read_text() + "\n = A new section of calibration text = \n")
    haloquant_fleet(str(fleet))
    redid = last_run()["redid"]
    assert sorted(redid) == sorted(s for s in member_stages("qwen", MEMBER_SWEEPS["qwen"])
                                   if s not in ("qwen/plan_widening", "qwen/rotate"))
    assert redid["qwen/calibrate"] == "changed: input calibration.text"


def test_fleet_deployment_has_cron_schedule(tmp_path):
    from haloquant.flows.deploy import FLEET_DEPLOYMENT_NAME, build_fleet_deployment

    write_params(tmp_path / "a", small_params())
    fleet = write_params(tmp_path, {"members": {"a": "a/params.yaml"}}, "fleet.yaml")
    dep = build_fleet_deployment(str(fleet), "0 4 * * 1")
    assert dep.name == FLEET_DEPLOYMENT_NAME and dep.parameters == {"fleet_file": str(fleet.resolve())}
    assert [s.schedule.cron for s in dep.schedules] == ["0 4 * * 1"]


@pytest.mark.slow
def test_a_fleet_as_one_dvc_repro(tmp_path):
    """`dvc repro <fleet>/dvc.yaml` runs both members' stages and the fleet report; an edited budget
    of one member re-runs that member's plan_widening (it re-decides widening), allocate … validate and the report
    only."""
    proj = copy_project(tmp_path / "proj")
    models = {"tiny": proj / "data" / "models" / "ref-llama-tiny", "qwen": make_model(QWEN, proj / "models")}
    fleet = make_fleet(proj / "fleet", models, project=proj)
    cli = [sys.executable, "-m", "haloquant.flows.cli", "fleet"]
    subprocess.run(cli + ["dvc-yaml", str(fleet)], check=True, cwd=proj)
    check = subprocess.run(cli + ["dvc-yaml", "--check", str(fleet)], capture_output=True, text=True, cwd=proj)
    assert check.returncode == 0, check.stderr
    sh("git init -q && git add -A && git -c user.email=t@t -c user.name=t commit -qm init && dvc init -q", proj)

    first = ran(sh("dvc repro fleet/dvc.yaml", proj))
    for member in ("tiny", "qwen"):
        assert [s for s in first if s in [f"fleet/{member}/dvc.yaml:{x}" for x in STAGES]] == \
            [f"fleet/{member}/dvc.yaml:{x}" for x in STAGES]
    assert first[-1] == "fleet/dvc.yaml:fleet_report"
    report = yaml.safe_load((proj / "fleet" / "artifacts" / "fleet" / "report.json").read_text())
    assert set(report["members"]) == {"tiny", "qwen"}
    assert ran(sh("dvc repro fleet/dvc.yaml", proj)) == []

    set_budget(fleet, "tiny", 4.75)
    third = ran(sh("dvc repro fleet/dvc.yaml", proj))
    assert third == [f"fleet/tiny/dvc.yaml:{x}" for x in ["plan_widening"] + STAGES[4:]] + ["fleet/dvc.yaml:fleet_report"]
    plots = sh("dvc plots show --json fleet/dvc.yaml", proj)
    assert "cross-model" in plots


def test_fleet_spec_errors_name_the_member(tmp_path):
    from haloquant import HaloquantError
    from haloquant.schemas.fleet import load_fleet

    write_params(tmp_path / "a", small_params())
    bad = small_params()
    bad["allocation"]["budget"] = {"bits_per_weight": "four"}
    write_params(tmp_path / "b", bad)
    fleet = write_params(tmp_path, {"members": {"a": "a/params.yaml", "b": "b/params.yaml"}}, "fleet.yaml")
    with pytest.raises(HaloquantError, match=r"(?s)members\.b: .*allocation\.budget\.bits_per_weight"):
        load_fleet(fleet)
    write_params(tmp_path, {"members": {"a": "a/params.yaml", "c": "c/params.yaml"}}, "fleet.yaml")
    with pytest.raises(HaloquantError, match=r"members\.c: params file .* not found"):
        load_fleet(fleet)
    write_params(tmp_path, {"members": {"a": "a/params.yaml", "a2": "a/params.yaml"}}, "fleet.yaml")
    with pytest.raises(HaloquantError, match=r"share the folder"):
        load_fleet(fleet)
    write_params(tmp_path, {"members": {"a b": "a/params.yaml"}}, "fleet.yaml")
    with pytest.raises(HaloquantError, match=r"members: .*member names \['a b'\]"):
        load_fleet(fleet)
    # DVC interpolates ${allocation.policy} from the member's own file: a key left to its default is named
    from haloquant.tasks.fleet import write_fleet_dvc

    write_params(tmp_path, {"members": {"a": "a/params.yaml"}}, "fleet.yaml")
    with pytest.raises(HaloquantError, match=r"members\.a: .*params\.yaml must spell out allocation\.policy, allocation\.refine, allocation\.rules"):
        write_fleet_dvc(fleet)
    assert not (tmp_path / "a" / "dvc.yaml").exists()
    r = subprocess.run([sys.executable, "-m", "haloquant.flows.cli", "fleet", "check", str(tmp_path / "none.yaml")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "fleet file not found" in r.stderr and "Traceback" not in r.stderr


def test_the_shipped_example_fleet_checks_and_generates_its_dvc_files():
    """fleets/example ships without dvc.yaml files (they would put its stages in the repository's
    `dvc status`); generated, they name the repository's code relative to each member."""
    from haloquant.schemas.fleet import load_fleet
    from haloquant.tasks.fleet import check_dvc_keys, fleet_dvc_files

    r = subprocess.run([sys.executable, "-m", "haloquant.flows.cli", "fleet", "check", "fleets/example/fleet.yaml"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "2 members" in r.stdout, r.stderr
    fleet = load_fleet(REPO / "fleets" / "example" / "fleet.yaml")
    check_dvc_keys(fleet)
    files = fleet_dvc_files(fleet)
    member = yaml.safe_load(files[REPO / "fleets" / "example" / "ref-llama-tiny" / "dvc.yaml"])
    root = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert member["stages"].keys() == root["stages"].keys()
    assert member["stages"]["quantize"]["deps"] == [d if d.startswith(("${", "artifacts/")) else f"../../../{d}"
                                                    for d in root["stages"]["quantize"]["deps"]]
    report = yaml.safe_load(files[REPO / "fleets" / "example" / "dvc.yaml"])["stages"]["fleet_report"]
    assert "ref-llama-tiny-gptq/artifacts/pareto/pareto.json" in report["deps"]
