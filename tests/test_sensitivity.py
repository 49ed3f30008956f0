"""sensitivity.llama_cpp_candidate: with it the table prices each format as quantize writes it (per
block the better of haloquant's fit and llama.cpp's); without it haloquant's fit alone."""

from __future__ import annotations

import pytest

from haloquant.schemas.params import CalibrationSpec, ModelSpec, QuantizeSpec, SensitivitySpec
from haloquant.tasks.calibrate import calibrate
from haloquant.tasks.sensitivity import score_sensitivity
from tests.conftest import CALIB_TEXT, TINY

SPEC = ModelSpec(path=TINY, device="cpu", add_bos=True)
FORMATS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0"]


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("candidate")
    calibrate(SPEC, CalibrationSpec(text=CALIB_TEXT, n_sequences=4, seq_len=64), tmp / "cal")
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
