"""kl_fisher (haloquant/fisher.py): one forward and backward pass prices every tensor and format in
KL units — checked against the KL measured with each quantized tensor swapped into the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from haloquant.fisher import output_fisher
from haloquant.modelio import load_model, quantizable_tensors
from haloquant.schemas.params import CalibrationSpec, ModelSpec, QuantizeSpec, SensitivitySpec
from haloquant.tasks.calibrate import calibrate
from haloquant.tasks.sensitivity import score_sensitivity
from tests.conftest import CALIB_TEXT, calibrate_tiny, TINY

FORMATS = ["Q2_K", "Q3_K", "Q4_K", "Q8_0"]


SPEC = ModelSpec(path=TINY, device="cpu", add_bos=True)


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fisher") / "calibrate"
    calibrate_tiny(out, 8, 128)
    return out


@pytest.fixture(scope="module")
def tables(calib_dir):
    return {m: score_sensitivity(SPEC, SensitivitySpec(formats=FORMATS, metric=m, kl_sequences=8), QuantizeSpec(),
                                 calib_dir, calib_dir.parent / m)
            for m in ("kl_fisher", "kl_end_to_end")}


def test_fisher_costs_are_the_measured_kl(tables):
    """Every tensor × format: the second-order estimate is the measured KL to within a small factor,
    on average unbiased, and it orders the costs as the measurement does."""
    est, measured = [], []
    for a, b in zip(tables["kl_fisher"].tensors, tables["kl_end_to_end"].tensors):
        assert a.name == b.name and a.candidates.keys() == b.candidates.keys()
        for f in a.candidates:
            assert a.candidates[f].error > 0 and a.candidates[f].bytes == b.candidates[f].bytes
            est.append(a.candidates[f].error)
            measured.append(b.candidates[f].error)
    log_ratio = np.log(est) - np.log(measured)
    assert abs(log_ratio.mean()) < 0.15
    assert np.abs(log_ratio).max() < np.log(2.0)
    assert np.corrcoef(np.log(est), np.log(measured))[0, 1] > 0.99
    assert tables["kl_fisher"].metric == "kl_fisher"


def test_output_fisher_is_reproducible_and_leaves_the_model_alone():
    model = load_model(TINY, "cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    modules = sorted({t.module for t in quantizable_tensors(model) if t.kind != "token_embd"} | {"lm_head"})
    first, again = output_fisher(model, ids, modules, seed=3), output_fisher(model, ids, modules, seed=3)
    other = output_fisher(model, ids, modules, seed=4)
    for m in modules:
        assert torch.equal(first.channels[m], again.channels[m]) and first.coherence[m] == again.coherence[m]
        assert first.channels[m].shape == (dict(model.named_modules())[m].out_features,)
        assert (first.channels[m] >= 0).all() and first.channels[m].sum() > 0
    assert any(not torch.equal(first.channels[m], other.channels[m]) for m in modules)  # labels are sampled
    assert first.block0.shape == (model.config.hidden_size,)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None


def test_kl_fisher_prices_an_untied_embedding_and_head(tmp_path):
    """An untied embedding is only looked up (no linear makes it): priced at block 0's input; the
    separate output head by its own logits' Fisher."""
    from tests.modelzoo import CASES, make_model

    case = next(c for c in CASES if not c.tied)
    spec = ModelSpec(path=make_model(case, tmp_path / "zoo"), device="cpu")
    calibrate(spec, CalibrationSpec(text=CALIB_TEXT, n_sequences=4, seq_len=64), tmp_path / "calibrate")
    table = score_sensitivity(spec, SensitivitySpec(formats=["Q4_0", "Q8_0"], metric="kl_fisher", kl_sequences=4),
                              QuantizeSpec(), tmp_path / "calibrate", tmp_path / "sensitivity")
    kinds = {t.kind for t in table.tensors}
    assert {"token_embd", "output"} <= kinds
    for t in table.tensors:
        assert 0 < t.candidates["Q8_0"].error < t.candidates["Q4_0"].error, t.name


def test_probe_cost_is_what_the_probes_compute():
    """probe_tflop, which metric auto compares with its budget, is the probes' real matmul work:
    torch's FLOP counter over one kl_calibrated probe per tensor agrees within 5 %."""
    from torch.utils.flop_counter import FlopCounterMode

    from haloquant.tasks.sensitivity import KLProbe, probe_tflop

    model = load_model(TINY, "cpu")
    infos = quantizable_tensors(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    probe = KLProbe(model, ids)
    params = dict(model.named_parameters())
    with FlopCounterMode(display=False) as counter:
        for t in infos:
            probe.kl(t.name, params[t.name].detach() * 0.99, probe.first_block(t))
    assert probe_tflop(model, infos, 2, 64) == pytest.approx(counter.get_total_flops() / 1e12, rel=0.05)


def test_auto_metric_runs_kl_fisher_over_budget_and_kl_calibrated_within(tables, calib_dir, tmp_path):
    from haloquant.tasks.sensitivity import probe_tflop, resolve_metric

    model = load_model(TINY, "cpu")
    infos = quantizable_tensors(model)
    ids = torch.zeros(8, 128, dtype=torch.long)
    cost = probe_tflop(model, infos, 8, 128)
    assert resolve_metric(SensitivitySpec(formats=FORMATS, probe_budget_tflop=cost * 1.01), model, infos, ids) == \
        "kl_calibrated"
    assert resolve_metric(SensitivitySpec(formats=FORMATS, probe_budget_tflop=cost * 0.99), model, infos, ids) == \
        "kl_fisher"
    assert resolve_metric(SensitivitySpec(formats=FORMATS, metric="kl_end_to_end", probe_budget_tflop=1e-9), model,
                          infos, ids) == "kl_end_to_end"
    # the table says what ran, and holds the same costs as that metric asked for by name
    auto = score_sensitivity(SPEC, SensitivitySpec(formats=FORMATS, probe_budget_tflop=cost * 0.99), QuantizeSpec(),
                             calib_dir, tmp_path / "auto")
    assert auto.metric == "kl_fisher"
    assert [t.candidates for t in auto.tensors] == [t.candidates for t in tables["kl_fisher"].tensors]
