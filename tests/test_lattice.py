"""The lattice i-quants (IQ1_S … IQ3_S): their fields read and written exactly as gguf's reference
decoder sees them, GPTQ's group rounding, and block tuning leaving their codes as they are."""

import numpy as np
import pytest
import torch
from gguf import quants as gq

from haloquant.formats import get_format
from haloquant.gptq import gptq_quantize
from haloquant.latticequants import GROUP, LATTICES

NAMES = list(LATTICES)


def weight(rows=40, cols=512, seed=0) -> np.ndarray:
    w = np.random.default_rng(seed).standard_t(5, (rows, cols)).astype(np.float32) * 0.03
    w[0, :256] = 0.0  # an all-zero super-block
    w[1, :32] = 0.01  # a constant group
    return w


@pytest.mark.parametrize("name", NAMES)
def test_fields_decode_as_gguf_does(name):
    fmt, w = get_format(name), weight()
    data = fmt.encode(w, np.random.default_rng(1).lognormal(0, 1, w.shape[1]).astype(np.float32))
    blocks = fmt.lattice.read(data, w.shape)
    assert blocks.index.shape == (w.shape[0], w.shape[1] // GROUP, GROUP // fmt.lattice.vector)
    np.testing.assert_array_equal(blocks.dequantize(), gq.dequantize(data, fmt.ggml_type).reshape(w.shape))
    np.testing.assert_array_equal(fmt.lattice.write(data, w.shape, blocks.index, blocks.signs), data)


@pytest.mark.parametrize("name", NAMES)
def test_written_fields_are_what_llama_cpp_decodes(name):
    """Random grid indices and sign bytes (even parity where the type needs it; none for IQ1's signed
    grid) written into the encoder's bytes: gguf's decoder gives exactly those grid points, signs and
    the kept scales (and IQ1's kept offsets)."""
    fmt, w = get_format(name), weight(seed=2)
    lay = fmt.lattice
    data = fmt.encode(w, np.ones(w.shape[1], np.float32))
    before = lay.read(data, w.shape)
    rng = np.random.default_rng(3)
    index = rng.integers(0, len(lay.grid), before.index.shape)
    signs = None if lay.signed else rng.integers(0, 256, before.signs.shape).astype(np.uint8)
    if lay.parity:
        odd = np.unpackbits(signs[..., None], axis=-1).sum(-1) % 2 == 1
        signs = np.where(odd, signs ^ 0x80, signs).astype(np.uint8)
    new = lay.write(data, w.shape, index, signs)
    after = lay.read(new, w.shape)
    np.testing.assert_array_equal(after.index, index)
    if lay.signed:
        assert after.signs is None and set(np.unique(before.offset)) == {-0.125, 0.125}
        np.testing.assert_array_equal(after.offset, before.offset)
    else:
        np.testing.assert_array_equal(after.signs, signs)
    np.testing.assert_array_equal(after.scale, before.scale)
    np.testing.assert_array_equal(after.dequantize(), gq.dequantize(new, fmt.ggml_type).reshape(w.shape))


def test_odd_sign_count_is_refused_where_parity_is_implied():
    fmt, w = get_format("IQ2_XXS"), weight()
    data = fmt.encode(w)
    b = fmt.lattice.read(data, w.shape)
    signs = b.signs.copy()
    signs[0, 0] = 0x01
    with pytest.raises(ValueError, match="even number"):
        fmt.lattice.write(data, w.shape, b.index, signs)


@pytest.mark.parametrize("name", ["IQ2_S", "IQ3_S"])
def test_nearest_is_the_exact_minimum_with_free_signs(name):
    """With 8 free sign bits the group's best point is |x|'s nearest grid point under x's signs:
    checked against every grid point (per vector) by brute force, weighted."""
    lay = LATTICES[name]
    grid = torch.from_numpy(lay.grid)
    x = torch.from_numpy(np.random.default_rng(4).standard_normal((300, GROUP)).astype(np.float32)) * 6
    wt = torch.from_numpy(np.random.default_rng(5).lognormal(0, 1, GROUP).astype(np.float32))
    _, _, values = lay.nearest(x, grid, wt)
    err = ((x - values) ** 2 * wt).sum(-1)
    per = GROUP // lay.vector
    t, w = x.abs().reshape(-1, per, 1, lay.vector), wt.reshape(per, lay.vector)
    best = (((t - grid) ** 2) * w[:, None, :]).sum(-1).min(-1).values.sum(-1)
    torch.testing.assert_close(err, best, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["IQ1_S", "IQ1_M"])
def test_nearest_on_a_signed_grid_is_the_exact_minimum_after_the_offset(name):
    """IQ1: the group's best point of the 2048 signed ones, for x minus the group's kept offset (±1/8),
    weighted: checked by brute force; the values returned include the offset."""
    lay = LATTICES[name]
    grid = torch.from_numpy(lay.grid)
    rng = np.random.default_rng(7)
    x = torch.from_numpy(rng.standard_normal((300, GROUP)).astype(np.float32))
    wt = torch.from_numpy(rng.lognormal(0, 1, GROUP).astype(np.float32))
    offset = torch.from_numpy(np.where(rng.random(300) < 0.5, -0.125, 0.125).astype(np.float32))
    index, _, values = lay.nearest(x, grid, wt, offset)
    torch.testing.assert_close(values, grid[index[:, 0]] + offset[:, None])
    err = ((x - values) ** 2 * wt).sum(-1)
    best = (((x[:, None, :] - offset[:, None, None] - grid[None]) ** 2) * wt).sum(-1).min(-1).values
    torch.testing.assert_close(err, best, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_identity_hessian_rounds_no_worse_than_ggml_on_its_scales(name):
    """With H = I GPTQ keeps ggml's block scales and re-chooses every group's point: its plain
    squared error is at most ggml's own choice's (which weighs the error differently)."""
    fmt, w = get_format(name), weight(seed=6)
    data = gptq_quantize(w, fmt, torch.eye(w.shape[1]), damp=1e-9, act_order=False)
    ref = np.concatenate([fmt.encode(w[:, j : j + 256], np.ones(256, np.float32)) for j in (0, 256)], axis=1)
    np.testing.assert_array_equal(fmt.lattice.read(data, w.shape).scale, fmt.lattice.read(ref, w.shape).scale)
    err = lambda d: float(((fmt.decode(d, w.shape) - w) ** 2).sum())  # noqa: E731
    assert err(data) <= err(ref)


@pytest.mark.parametrize("formats, bpw, needed", [
    (["Q2_K", "IQ2_XXS", "IQ2_S", "IQ3_S", "Q4_K", "Q8_0"], 2.4, {"IQ2_XXS", "IQ2_S", "IQ3_S"}),
    (["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ3_S", "Q4_K", "Q8_0"], 1.9, {"IQ1_S", "IQ1_M"}),  # below IQ2_XXS's 2.06
], ids=["2.4-bpw", "1.9-bpw-iq1"])
def test_pipeline_below_q2_k_with_lattice_candidates(formats, bpw, needed, tmp_path):
    """The whole pipeline at 2.4 bits per weight — infeasible with k-quants alone (Q2_K: 2.625) — and
    at 1.9, below every type but IQ1's, with lattice candidates and GPTQ: the allocation uses them, the
    validate gate passes (llama.cpp within 1 % of torch on the same decoded weights, llama.cpp's
    tokens = the tokenizer's) and onnxruntime agrees with torch."""
    import json

    from haloquant.tasks.runner import run_all
    from tests.conftest import small_params, write_params

    params = small_params(**{"sensitivity.formats": formats, "allocation.budget": {"bits_per_weight": bpw},
                             "quantize.method": "gptq", "validate.gate.max_ppl_ratio": 5.0 if bpw > 2 else 50.0})
    run_all(write_params(tmp_path, params))
    allocation = json.loads((tmp_path / "artifacts" / "allocate" / "allocation.json").read_text())
    used = {t["format"] for t in allocation["tensors"]}
    assert used & needed and allocation["bits_per_weight"] <= bpw
    metrics = json.loads((tmp_path / "artifacts" / "validate" / "metrics.json").read_text())
    assert abs(metrics["llama_cpp_ppl_gap"]) < 0.01, metrics
    assert metrics["onnx_max_abs_logit_error"] < 1e-3, metrics
