"""params.yaml validation: every problem is an error naming the key path, before anything runs."""

import subprocess
import sys

import pytest
import yaml

from haloquant import HaloquantError
from haloquant.schemas.params import load_params
from tests.conftest import REPO, small_params, write_params


def check(tmp_path, data):
    return subprocess.run([sys.executable, "-m", "haloquant.flows.cli", "check", "--params",
                           str(write_params(tmp_path, data))], capture_output=True, text=True, cwd=REPO)


def test_shipped_params_are_valid():
    p = load_params(REPO / "params.yaml")
    assert p.model.path == REPO / "data" / "models" / "ref-llama-tiny"
    assert p.allocation.budget.bits_per_weight is not None


def test_check_passes_on_valid_spec(tmp_path):
    r = check(tmp_path, small_params())
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout
    # a short spec is valid (the schema's defaults fill it) but dvc repro would refuse it: check says which keys
    assert "note: dvc repro reads" in r.stdout and "rotate.widen" in r.stdout and "quantize.method" in r.stdout
    full = yaml.safe_load((REPO / "params.yaml").read_text())
    full["model"], full["calibration"], full["validate"] = (small_params()[k] for k in ("model", "calibration",
                                                                                        "validate"))
    r = check(tmp_path, full)
    assert r.returncode == 0 and "ok" in r.stdout and "note:" not in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("mutate, path, expected", [
    (lambda p: p["allocation"].update(solvr="milp"), "allocation.solvr", "unknown key"),
    (lambda p: p.update(extra_section={}), "extra_section", "unknown key"),
    (lambda p: p["calibration"].update(n_sequences="many"), "calibration.n_sequences", "valid integer"),
    (lambda p: p["allocation"]["budget"].update(bits_per_weight=[4]), "allocation.budget.bits_per_weight",
     "valid number"),
    (lambda p: p["sensitivity"].update(formats=["Q4_0", "Q9_9"]), "sensitivity.formats", "unknown format"),
    (lambda p: p["allocation"].update(budget={"bits_per_weight": 4, "total_bytes": 10}), "allocation.budget",
     "exactly one"),
    (lambda p: p.pop("model"), "model", "required key is missing"),
    (lambda p: p.update(sweep={"bits_per_weight": [3.5, 4]}), "sweep.bits_per_weight", "4.0, not 4"),
    (lambda p: p.update(sweep={"presets": ["Q4_K_X"]}), "sweep.presets", "unknown llama.cpp preset"),
    (lambda p: p["allocation"].update(budget={"file_mb": 3.0, "bits_per_weight": 4.0}), "allocation.budget",
     "exactly one"),
    (lambda p: p["allocation"].update(solver="sac", policy="no/such/policy"), "allocation.policy",
     "is not a train_policy output"),
    (lambda p: p["sensitivity"].update(metric="none"), "allocation.solver", "needs measured costs"),
    (lambda p: p.update(train_policy={"budget_range": [5.0, 3.0]}), "train_policy", "budget_range"),
])
def test_bad_spec_names_the_key(tmp_path, mutate, path, expected):
    data = small_params()
    mutate(data)
    r = check(tmp_path, data)
    assert r.returncode == 2
    assert f"{path}:" in r.stderr and expected in r.stderr, r.stderr


def test_invalid_yaml_is_named(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("model: [unclosed\n")
    with pytest.raises(HaloquantError, match="not valid YAML"):
        load_params(f)


def test_missing_model_folder(tmp_path):
    r = check(tmp_path, small_params(**{"model.path": str(tmp_path / "nope")}))
    assert r.returncode == 2 and "model.path" in r.stderr and "does not exist" in r.stderr


def test_empty_and_identical_texts(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    r = check(tmp_path, small_params(**{"calibration.text": str(empty)}))
    assert r.returncode == 2 and "calibration.text" in r.stderr and "empty" in r.stderr
    same = small_params()
    copy = tmp_path / "copy_of_test.raw"
    copy.write_bytes(open(same["validate"]["text"], "rb").read())
    r = check(tmp_path, small_params(**{"calibration.text": str(copy)}))
    assert r.returncode == 2 and "calibration.text" in r.stderr and "same text" in r.stderr


def test_dvc_yaml_is_generated_from_registry():
    r = subprocess.run([sys.executable, "-m", "haloquant.flows.cli", "dvc-yaml"], capture_output=True, text=True,
                       cwd=REPO, check=True)
    assert r.stdout == (REPO / "dvc.yaml").read_text(), "dvc.yaml is stale: run `haloquant dvc-yaml > dvc.yaml`"
    stages = yaml.safe_load(r.stdout)["stages"]
    assert list(stages) == ["environment", "plan_widening", "rotate", "calibrate", "sensitivity", "allocate",
                            "scale_fold", "quantize", "export_gguf", "export_onnx", "validate", "train_policy", "sweep",
                            "preset", "pareto"]
    assert stages["sweep"]["foreach"] == "${sweep.bits_per_weight}"
    assert stages["environment"]["always_changed"] is True
    # the allocation section is read by allocate alone: editing the budget can never re-run calibrate or sensitivity
    params_of = {n: s.get("params") or s.get("do", {}).get("params", []) for n, s in stages.items()}
    assert [n for n, p in params_of.items() if "allocation" in p] == ["allocate"]
    # the budget reaches the model copy only through the widening decision's file (a rotated copy is not rewritten
    # for a budget edit that decides the same)
    assert [n for n, p in params_of.items() if "allocation.budget" in p] == ["plan_widening"]
    assert "artifacts/plan_widening/widening.json" in stages["rotate"]["deps"]
    assert not any(p.startswith(("allocation", "sensitivity", "rotate.widen")) for p in params_of["rotate"])
    # dvc repro refuses a stage whose params key is not written in params.yaml: every key is there
    from haloquant.tasks.runner import unwritten_dvc_keys

    assert unwritten_dvc_keys(REPO / "params.yaml") == []
    # the rotated copy is model-sized: DVC records it without caching it, and the stages after it read its record
    assert stages["rotate"]["outs"] == ["artifacts/rotate/rotation.json", {"artifacts/rotate/model": {"cache": False}}]
    assert all("artifacts/rotate/rotation.json" in s["deps"] for n, s in stages.items()
               if n in ("calibrate", "sensitivity", "allocate", "scale_fold", "quantize", "export_gguf", "validate"))
    assert not any(p.startswith("allocation.budget") for p in params_of["sweep"])


def test_every_dvc_params_key_is_in_the_shipped_params_yaml():
    """DVC refuses a stage whose params key the file lacks (a schema default is not enough)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    shipped = yaml.safe_load((REPO / "params.yaml").read_text())
    missing = []
    for name, s in stages.items():
        for key in s.get("params") or s.get("do", {}).get("params", []):
            node = shipped
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    missing.append(f"{name}: {key}")
                    break
                node = node[part]
    assert not missing, missing
