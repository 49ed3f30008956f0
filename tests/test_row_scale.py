"""Output-scale correction (haloquant/row_scale.py, quantize.correct_row_scales): a row's block
scales rescaled in place — llama.cpp's bytes layout, decoded by gguf's reference decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from haloquant.formats import FORMATS, get_format
from haloquant.row_scale import correct_row_scales, rescalable, scaled_bytes
from tests.conftest import CALIB_TEXT, TINY

QUANTIZED = [f for f in FORMATS.values() if not f.is_float]


def _weight(rows: int = 64, cols: int = 512) -> np.ndarray:
    w = load_file(str(TINY / "model.safetensors"))["model.layers.1.mlp.down_proj.weight"].astype(np.float32)
    return np.ascontiguousarray(np.resize(w, (rows, cols)))


def _gram(cols: int, seed: int = 0) -> torch.Tensor:
    """E[xxᵀ] of correlated inputs with a few outlier channels, as a layer's input has."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, cols // 8, generator=g) @ torch.randn(cols // 8, cols, generator=g) \
        + 0.3 * torch.randn(4096, cols, generator=g)
    x[:, :4] *= 8
    return (x.T @ x / x.shape[0]).double()


@pytest.mark.parametrize("fmt", QUANTIZED, ids=lambda f: f.name)
def test_scale_fields_scale_the_whole_decoded_block(fmt):
    """Every quantized type names its scale fields, and multiplying them by α multiplies the block
    as gguf's reference decoder reads it by α — exactly, for α a power of two (scales stay normal fp16 numbers)."""
    assert rescalable(fmt)
    w = _weight()
    data = fmt.encode(w)
    alpha = np.where(np.arange(w.shape[0]) % 2 == 0, 2.0, 4.0).astype(np.float32)  # (halving can go subnormal)
    scaled = fmt.decode(scaled_bytes(fmt, data, alpha), w.shape)
    np.testing.assert_array_equal(scaled, fmt.decode(data, w.shape) * alpha[:, None])


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q6_K", "Q4_0", "Q5_1", "IQ4_XS", "IQ3_S", "IQ1_S",
                                  "IQ1_M"])
def test_correction_lowers_every_rows_output_error_and_touches_only_scales(name):
    fmt = get_format(name)
    w = _weight()
    gram = _gram(w.shape[1])
    data = fmt.encode(w, torch.diagonal(gram).float().numpy())
    out, before, after = correct_row_scales(fmt, data, torch.from_numpy(w), gram)

    def row_errors(b):
        d = torch.from_numpy(w).double() - torch.from_numpy(fmt.decode(b, w.shape)).double()
        return ((d @ gram) * d).sum(1)

    e0, e1 = row_errors(data), row_errors(out)
    assert before == pytest.approx(float(e0.sum()), rel=1e-9) and after == pytest.approx(float(e1.sum()), rel=1e-9)
    assert bool((e1 <= e0).all()) and after < 0.999 * before, (before, after)
    changed = (out != data).reshape(w.shape[0], -1, fmt.type_size).any(axis=(0, 1))
    fields = {o + i for o in fmt.codec.scale_fields for i in (0, 1)} | set(range(*fmt.codec.packed_scale_bytes))
    assert set(np.flatnonzero(changed)) <= fields  # codes, sub-scales and signs are as encoded
    if fmt.codec.packed_scale is not None:  # IQ1_M: only the top 4 bits of each scale word (d's pieces)
        words = lambda b: b.reshape(w.shape[0], -1, fmt.type_size)[..., 48:56].copy().view(np.uint16)  # noqa: E731
        assert np.array_equal(words(out) & 0x0FFF, words(data) & 0x0FFF)


def test_quantize_with_row_scale_correction(tmp_path):
    """The quantize stage with correct_row_scales: the same formats and bytes per tensor, each
    decoder-block tensor's output error (calibration Gram) no higher and the model's in total lower;
    the embedding (looked up, not an output) as without."""
    from haloquant.calibstats import CalibrationStats
    from haloquant.quantized import read_quantized
    from haloquant.schemas.params import (AllocationSpec, CalibrationSpec, FoldSpec, ModelSpec, QuantizeSpec,
                                          SensitivitySpec)
    from haloquant.tasks.allocate import allocate
    from haloquant.tasks.calibrate import calibrate
    from haloquant.tasks.quantize import quantize
    from haloquant.tasks.scale_fold import scale_fold
    from haloquant.tasks.sensitivity import score_sensitivity

    spec = ModelSpec(path=TINY, device="cpu", add_bos=True)
    calibrate(spec, CalibrationSpec(text=CALIB_TEXT, n_sequences=4, seq_len=64), tmp_path / "cal")
    score_sensitivity(spec, SensitivitySpec(formats=["Q2_K", "Q3_K", "Q4_K"], metric="hessian_trace"),
                      QuantizeSpec(), tmp_path / "cal", tmp_path / "sens")
    allocate(AllocationSpec(budget={"bits_per_weight": 3.5}), tmp_path / "sens", tmp_path / "alloc")
    scale_fold(spec, FoldSpec(method="identity"), tmp_path / "cal", tmp_path / "alloc", tmp_path / "fold")
    runs = {on: quantize(spec, QuantizeSpec(correct_row_scales=on, correct_input_scales=False), tmp_path / "cal", tmp_path / "alloc",
                         tmp_path / "fold", tmp_path / f"q{on}") for on in (False, True)}
    assert [(q.name, q.format, q.bytes) for q in runs[False].quantized] == \
        [(q.name, q.format, q.bytes) for q in runs[True].quantized]
    arrays = {on: read_quantized(tmp_path / f"q{on}")[1] for on in (False, True)}
    from haloquant.modelio import load_model, quantizable_tensors

    model = load_model(TINY, "cpu")
    stats = CalibrationStats(tmp_path / "cal", model=model)
    params = dict(model.named_parameters(remove_duplicate=False))
    totals = {False: 0.0, True: 0.0}
    for t in quantizable_tensors(model):
        fmt = get_format(next(q.format for q in runs[False].quantized if q.name == t.name))
        if t.kind == "token_embd":
            np.testing.assert_array_equal(arrays[True][t.name], arrays[False][t.name])
            continue
        g, w = stats.gram(t).double(), params[t.name].detach().double()
        errs = {}
        for on in (False, True):
            d = w - torch.from_numpy(fmt.decode(arrays[on][t.name], t.shape)).double()
            errs[on] = float(((d @ g) * d).sum())
            totals[on] += errs[on]
        assert errs[True] <= errs[False] * (1 + 1e-12), t.name
    assert totals[True] < 0.995 * totals[False], totals
