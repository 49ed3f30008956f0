"""Block-output reconstruction (haloquant/reconstruct.py): the tuned weights are the format's own
grid points (bytes differ only in codes, scales and mins untouched), tuning starts exactly at
the quantizer's codes, and on the real tiny model it lowers every block's output error and the
held-out KL from the float model below GPTQ's on the same type map."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from haloquant.evaluation import score
from haloquant.formats import get_format
from haloquant.modelio import load_model, load_tokenizer, quantizable_tensors
from haloquant.quantized import load_quantized_model
from haloquant.reconstruct import GridWeight
from haloquant.schemas.params import BlockTuningSpec, ModelSpec, QuantizeSpec
from haloquant.textdata import eval_chunks, read_text, sequence_bos, tokenize
from tests.conftest import EVAL_TEXT, TINY
from tests.typemap import q3k_with_iq3s_down, quantize_at_type_map

TUNABLE = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "IQ4_XS"]


@pytest.mark.parametrize("name", TUNABLE)
def test_grid_weight_starts_at_the_format_bytes_and_moves_on_its_grid(name):
    fmt = get_format(name)
    w = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32)
    data = fmt.encode(w)
    g = GridWeight(fmt, data, w.shape, "cpu", rounded_from=w)
    ref = fmt.decode(data, w.shape)
    np.testing.assert_allclose(g.weight(hard=True).numpy(), ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(g.weight().detach().numpy(), ref, rtol=0, atol=1e-6)  # straight-through forward
    assert np.array_equal(g.tuned_data(), data)
    # every offset pushed to its limit: each code moves at most one step, the scales stay
    g.V.data[:] = torch.from_numpy(0.5 * np.sign(np.random.default_rng(1).standard_normal(w.shape)).astype(np.float32))
    moved = g.tuned_data()
    a, b = fmt.affine_blocks(data, w.shape), fmt.affine_blocks(moved, w.shape)
    assert np.array_equal(a.scale, b.scale) and np.array_equal(a.zero, b.zero)
    step = np.abs(a.q.astype(int) - b.q.astype(int))
    assert step.max() == 1 and step.mean() > 0.1
    np.testing.assert_allclose(fmt.decode(moved, w.shape), g.weight(hard=True).numpy(), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """The tiny model at Q3_K (Q6_K embedding; ffn_down in IQ3_S, a lattice type whose codes tuning
    leaves as they are), GPTQ with and without block tuning."""
    out = tmp_path_factory.mktemp("blocktune")
    spec = ModelSpec(path=TINY, device="cpu", add_bos=True)
    alone = {"correct_row_scales": False, "correct_input_scales": False}  # block tuning alone changes the codes
    quantize_at_type_map(spec, out, q3k_with_iq3s_down,
                         {"gptq": QuantizeSpec(method="gptq", **alone),
                          "tuned": QuantizeSpec(method="gptq", block_tuning=BlockTuningSpec(iters=40), **alone)},
                         n_sequences=64, seq_len=128)
    runs = {name: out / name for name in ("gptq", "tuned")}
    return spec, runs


def test_tuning_changes_codes_only_and_lowers_held_out_kl(tiny_runs):
    from safetensors.numpy import load_file

    spec, runs = tiny_runs
    gptq, tuned = load_file(str(runs["gptq"] / "tensors.safetensors")), load_file(str(runs["tuned"] / "tensors.safetensors"))
    infos = quantizable_tensors(load_model(TINY, "cpu"))
    changed = 0
    for t in infos:
        if t.layer < 0 or "ffn_down" in t.gguf_name:
            assert np.array_equal(gptq[t.name], tuned[t.name])  # outside the decoder blocks, or IQ3_S: untouched
            continue
        fmt = get_format("Q3_K")
        a, b = fmt.affine_blocks(gptq[t.name], t.shape), fmt.affine_blocks(tuned[t.name], t.shape)
        assert np.array_equal(a.scale, b.scale) and np.array_equal(a.zero, b.zero), t.name
        assert np.abs(a.q.astype(int) - b.q.astype(int)).max() <= 1, t.name
        changed += int((a.q != b.q).sum())
    assert changed > 0

    tok = load_tokenizer(TINY)
    chunks = eval_chunks(tokenize(tok, read_text(EVAL_TEXT, "eval")), 256, 8, sequence_bos(tok, True))
    ref = load_model(TINY, "cpu")
    kl = {name: score(load_quantized_model(TINY, d, "cpu"), chunks, ref)["kl_mean"] for name, d in runs.items()}
    assert kl["tuned"] < 0.97 * kl["gptq"], kl  # held-out text: the tuning generalises
