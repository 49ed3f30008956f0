"""sensitivity.llama_cpp_candidate: with it the table prices each format as quantize writes it (per
block the better of haloquant's fit and llama.cpp's); without it haloquant's fit alone."""

from __future__ import annotations

import pytest

from haloquant.schemas.params import ModelSpec, QuantizeSpec, SensitivitySpec
from haloquant.tasks.sensitivity import score_sensitivity
from tests.conftest import calibrate_tiny, TINY

SPEC = ModelSpec(path=TINY, device="cpu", add_bos=True)
FORMATS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0"]


@pytest.fixture(scope="module")
def cal_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("candidate") / "cal"
    calibrate_tiny(out, 4, 64)
    return out


@pytest.fixture(scope="module")
def tables(cal_dir):
    tmp = cal_dir.parent
    # hessian_trace is Σ_j E[x_j²] Σ_i ΔW_ij²: exactly the importance-weighted error the block choice minimises
    return {on: score_sensitivity(SPEC, SensitivitySpec(formats=FORMATS, metric="hessian_trace", llama_cpp_candidate=on),
                                  QuantizeSpec(), tmp / "cal", tmp / str(on))
            for on in (True, False)}


def test_the_llama_cpp_candidate_never_prices_a_format_higher(tables):
    """Block by block the better of two fits is never worse than one of them, so no tensor × format
    costs more with the candidate; and llama.cpp's imatrix fit wins blocks of every k-quant here (for Q4_0
    haloquant's fit is ggml's search with codes re-rounded to the stored fp16 scale: it may never lose)."""
    with_c = {t.name: t for t in tables[True].tensors}
    lower = {f: 0 for f in FORMATS}
    for own in tables[False].tensors:
        if own.kind == "token_embd":  # its lookup error is not what the block choice minimises
            continue
        for f, cost in own.candidates.items():
            both = with_c[own.name].candidates[f]
            assert both.bytes == cost.bytes
            assert both.error <= cost.error * (1 + 1e-4), (own.name, f)
            lower[f] += both.error < cost.error * (1 - 1e-4)
    assert all(lower[f] > 0 for f in FORMATS if f.endswith("_K")), str(lower)


def test_the_table_says_nothing_else_changed(tables):
    assert tables[True].metric == tables[False].metric == "hessian_trace"
    assert [t.name for t in tables[True].tensors] == [t.name for t in tables[False].tensors]
    assert tables[True].gguf_overhead_bytes == tables[False].gguf_overhead_bytes


def test_moments_of_a_large_tensor_in_row_chunks_are_the_whole_tensors(monkeypatch):
    """weight_moments takes a tensor beyond the chunk budget in two passes over row chunks (no
    float64 copy of a 128k-vocabulary head): the same moments as the whole tensor's, to float64
    rounding; skewed and offset weights, so that the centring matters."""
    import torch

    import haloquant.arrays
    from haloquant.embedding import weight_moments

    w = (torch.distributions.StudentT(3.0).sample((301, 77)) * 0.02 + 0.01).float()
    whole = weight_moments(w)
    monkeypatch.setattr(haloquant.arrays, "DEVICE_CHUNK_WEIGHTS", 20 * 77 + 3)
    chunked = weight_moments(w)
    assert chunked == pytest.approx(whole, rel=1e-10)
    assert whole[2] == float(w.abs().max()) and whole[1] > 3  # heavy tails: kurtosis above a Gaussian's


@pytest.mark.parametrize("metric", ["kl_fisher", "output_error"])
def test_costs_do_not_depend_on_the_row_chunking(metric, tmp_path, monkeypatch):
    """Sensitivity measures each format's error one row chunk at a time (the float copies of a large
    tensor are bounded by the chunk): many small chunks give the whole tensors' costs and features —
    the Fisher channels and token frequencies are taken row by row with the weights."""
    import json

    import haloquant.arrays

    calibrate_tiny(tmp_path / "cal", 4, 64)
    spec = SensitivitySpec(formats=["Q2_K", "Q4_K", "Q4_0"], metric=metric, llama_cpp_candidate=False)
    whole = score_sensitivity(SPEC, spec, QuantizeSpec(), tmp_path / "cal", tmp_path / "whole")
    monkeypatch.setattr(haloquant.arrays, "DEVICE_CHUNK_WEIGHTS", 4096 + 7)
    chunked = score_sensitivity(SPEC, spec, QuantizeSpec(), tmp_path / "cal", tmp_path / "chunked")
    assert whole.metric == chunked.metric == metric
    for a, b in zip(whole.tensors, chunked.tensors, strict=True):
        assert a.shape[0] * a.shape[1] > 4096 + 7  # every tensor was cut
        for f, cost in a.candidates.items():
            assert b.candidates[f].bytes == cost.bytes
            assert b.candidates[f].error == pytest.approx(cost.error, rel=1e-5), (a.name, f)
    feats = [json.loads((tmp_path / d / "embeddings.json").read_text())["tensors"] for d in ("whole", "chunked")]
    for a, b in zip(*feats, strict=True):
        assert b["values"] == pytest.approx(a["values"], rel=1e-9, abs=1e-12), a["gguf_name"]


def test_auto_candidate_is_on_for_a_cpu_and_off_for_a_gpu(tables, cal_dir, tmp_path):
    """`llama_cpp_candidate: auto` (the default) prices the real bytes on a CPU — the same table as `true` — and
    leaves llama.cpp's host-side blocks out where the model runs on a GPU."""
    import torch

    from haloquant.tasks.sensitivity import uses_llama_cpp_candidate

    auto = SensitivitySpec(formats=FORMATS, metric="hessian_trace")
    assert auto.llama_cpp_candidate == "auto"
    assert uses_llama_cpp_candidate(auto, torch.device("cpu"))
    assert not uses_llama_cpp_candidate(auto, torch.device("cuda", 0))
    assert not uses_llama_cpp_candidate(SensitivitySpec(formats=FORMATS, llama_cpp_candidate=False), "cpu")
    table = score_sensitivity(SPEC, auto, QuantizeSpec(), cal_dir, tmp_path)
    assert {t.name: t.candidates for t in table.tensors} == {t.name: t.candidates for t in tables[True].tensors}
