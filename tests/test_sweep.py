"""The budget sweep: points at several budgets and llama.cpp presets, gathered into one plot."""

import pytest
from gguf import GGUFReader

from haloquant.artifacts import read_json
from haloquant.tasks.runner import run_stage
from tests.conftest import small_params, write_params


@pytest.fixture(scope="module")
def sweep(pipeline_run):
    folder, _, _ = pipeline_run  # reuses its calibration and sensitivity (legacy formats: ≥ 4.5 bpw)
    params_file = write_params(folder, small_params(sweep={"bits_per_weight": [4.75, 5.5], "presets": ["Q4_K_M"],
                                                           "max_chunks": 2}), name="sweep.yaml")
    for name in ("sweep@4.75", "sweep@5.5", "preset@Q4_K_M", "pareto"):
        run_stage(name, params_file)
    return folder / "artifacts"


def test_sweep_points_follow_the_budget(sweep):
    pts = {p["label"]: p for p in read_json(sweep / "pareto" / "pareto.json")}
    assert set(pts) == {"4.75 bpw", "5.5 bpw", "Q4_K_M"}
    small, large = pts["4.75 bpw"], pts["5.5 bpw"]
    assert small["bits_per_weight"] <= 4.75 < large["bits_per_weight"] <= 5.5
    assert small["gguf_bytes"] < large["gguf_bytes"]
    assert all(p["n_chunks"] == 2 and 1 < p["ppl"] < 1000 for p in pts.values())


def test_preset_point_is_llama_cpp_with_imatrix(sweep):
    pt = read_json(sweep / "sweep" / "preset-Q4_K_M" / "point.json")
    assert pt["series"] == "llama.cpp+imatrix"
    ours = {t.name: t.tensor_type.name for t in GGUFReader(sweep / "sweep" / "preset-Q4_K_M" / "export_gguf" /
                                                           "model.gguf").tensors}
    theirs = {t.name: t.tensor_type.name for t in GGUFReader(sweep / "sweep" / "preset-Q4_K_M" / "f16" /
                                                             "llama.cpp.gguf").tensors}
    assert ours == theirs  # llama.cpp's own type map, re-quantized with the calibration imatrix
    assert set(ours.values()) >= {"Q4_K", "Q6_K"}


def test_unknown_sweep_stage_is_an_error(pipeline_run):
    from haloquant import HaloquantError

    folder, params_file, _ = pipeline_run
    with pytest.raises(HaloquantError, match="unknown stage 'sweep@9.9'"):
        run_stage("sweep@9.9", params_file)
