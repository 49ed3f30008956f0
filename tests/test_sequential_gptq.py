"""Sequential GPTQ (haloquant/sequential.py): every linear's Hessian is E[xxᵀ] of its input in
the model whose earlier weights are already the quantized ones — checked against a full forward
pass of exactly that model — and the quantize stage with `gptq.sequential` writes valid bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from haloquant.artifacts import write_json
from haloquant.calibstats import CalibrationStats
from haloquant.formats import get_format
from haloquant.gptq import gptq_quantize
from haloquant.modelio import load_model, quantizable_tensors
from haloquant.presets import allocation_from_type_map
from haloquant.schemas.params import CalibrationSpec, FoldSpec, ModelSpec, QuantizeSpec
from haloquant.sequential import quantize_sequentially
from haloquant.tasks.calibrate import calibrate
from haloquant.tasks.quantize import quantize
from haloquant.tasks.scale_fold import scale_fold
from tests.conftest import CALIB_TEXT, TINY


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    out = tmp_path_factory.mktemp("sequential")
    spec = ModelSpec(path=TINY, device="cpu", add_bos=True)
    calibrate(spec, CalibrationSpec(text=CALIB_TEXT, n_sequences=16, seq_len=64), out / "calibrate")
    return spec, out


def _input_gram(model, module_name: str, ids: torch.Tensor) -> torch.Tensor:
    """E[xxᵀ] of a module's input over a plain forward pass of the whole model."""
    acc = {}

    def hook(_m, args):
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        acc["s"] = acc.get("s", 0) + x.T @ x
        acc["n"] = acc.get("n", 0) + x.shape[0]

    h = model.get_submodule(module_name).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        h.remove()
    return (acc["s"] / acc["n"]).float()


def test_each_hessian_is_the_input_of_the_model_quantized_so_far(calibrated):
    _, out = calibrated
    model = load_model(TINY, "cpu")
    stats = CalibrationStats(out / "calibrate", model=model)
    params = dict(model.named_parameters())
    infos = [t for t in quantizable_tensors(model) if t.layer >= 0]
    fmt = get_format("Q3_K")
    formats = {t.name: fmt for t in infos}
    ids = stats.tensor("calibration_ids")
    calls: list[tuple] = []

    def encode(t, gram):
        return gptq_quantize(params[t.name].detach().numpy(), fmt, gram, 0.01, True)

    encoded = quantize_sequentially(model, ids, infos, formats, stats.report.input_of, encode,
                                    on_gram=lambda t, g: calls.append((t, g)))
    assert set(encoded) == {t.name for t in infos}
    assert [t.layer for t, _ in calls] == sorted(t.layer for t, _ in calls)  # blocks in order

    first = calls[0][0]  # block 0's first input: nothing before it is quantized — the float statistics
    torch.testing.assert_close(calls[0][1], stats.gram(first), rtol=1e-4, atol=1e-6)

    done: list = []
    checked = 0
    for i, (t, gram) in enumerate(calls):
        if i > 0 and calls[i - 1][1] is gram:  # same group: same input as the tensor before
            continue
        reference = load_model(TINY, "cpu")
        with torch.no_grad():
            ref_params = dict(reference.named_parameters())
            for d in done:
                ref_params[d.name].copy_(torch.from_numpy(fmt.decode(encoded[d.name], d.shape)))
        torch.testing.assert_close(gram, _input_gram(reference, t.module, ids), rtol=1e-4, atol=1e-6)
        checked += 1
        done += [u for u, g in calls if g is gram]
    assert checked == 4 * len({t.layer for t in infos})  # q/k/v, o, gate/up, down per block
    # the quantized inputs differ from the float statistics after the first group
    later = calls[-1]
    assert not torch.allclose(later[1], stats.gram(later[0]), rtol=1e-3)


def test_quantize_stage_with_sequential_gptq(calibrated):
    spec, out = calibrated
    infos = quantizable_tensors(load_model(TINY, "cpu"))
    type_map = {t.gguf_name: "Q6_K" if t.kind == "token_embd" else "Q4_K" for t in infos}
    write_json(out / "allocate" / "allocation.json", allocation_from_type_map(infos, type_map, "test").model_dump())
    scale_fold(spec, FoldSpec(), out / "calibrate", out / "allocate", out / "scale_fold")
    from safetensors.numpy import load_file

    runs = {}
    for name, sequential in (("float", False), ("sequential", True)):
        q = QuantizeSpec(method="gptq", gptq={"sequential": sequential})
        quantize(spec, q, out / "calibrate", out / "allocate", out / "scale_fold", out / name)
        runs[name] = load_file(str(out / name / "tensors.safetensors"))
    for t in infos:
        a, b = runs["float"][t.name], runs["sequential"][t.name]
        assert a.shape == b.shape and a.dtype == b.dtype
        if t.layer < 0:
            assert np.array_equal(a, b), t.name  # outside the blocks: the float statistics, as before
    first = next(t for t in infos if t.layer == 0)
    assert np.array_equal(runs["float"][first.name], runs["sequential"][first.name])  # block 0's first input
    assert any(not np.array_equal(runs["float"][t.name], runs["sequential"][t.name]) for t in infos if t.layer == 1)
