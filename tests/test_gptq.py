"""GPTQ on llama.cpp grids: exact reduction to RTN, lower calibration error than RTN, valid bytes."""

import numpy as np
import pytest
import torch
from gguf import quants as gq

from haloquant.calibstats import CalibrationStats
from haloquant.formats import get_format
from haloquant.gptq import gptq_quantize
from haloquant.modelio import load_model, quantizable_tensors
from tests.conftest import TINY

FORMATS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "Q4_0", "Q4_1", "Q5_0", "Q8_0"]
LATTICE = ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S"]  # identity case: tests/test_lattice.py


def calibrated_tensor(pipeline_run, gguf_name: str):
    """(tensor info, float weight, calibration stats) of one ref-llama-tiny tensor."""
    model = load_model(TINY, "cpu")
    stats = CalibrationStats(pipeline_run[0] / "artifacts" / "calibrate", model=model)
    t = next(t for t in quantizable_tensors(model) if t.gguf_name == gguf_name)
    return t, dict(model.named_parameters())[t.name].detach().numpy(), stats


@pytest.fixture(scope="module")
def layer(pipeline_run):
    t, w, stats = calibrated_tensor(pipeline_run, "blk.1.ffn_down.weight")
    return w, stats.gram(t)


def out_err(w, q, gram):
    d = torch.from_numpy(w - q)
    return float(((d @ gram) * d).sum())


@pytest.mark.parametrize("name", FORMATS)
def test_identity_hessian_is_round_to_nearest(layer, name):
    """With H = I no error propagates: GPTQ must be the format's own rounding on the same grid
    (up to how exact ties are broken: ggml rounds half up or away from zero, GPTQ half to even)."""
    w, _ = layer
    fmt = get_format(name)
    cols = w.shape[1]
    data = gptq_quantize(w, fmt, torch.eye(cols), damp=1e-9, act_order=False)
    # GPTQ fixes each block's grid when it reaches the block: the encoder on that block alone
    sb = fmt.block_size
    ref = np.concatenate([fmt.encode(w[:, j : j + sb], np.ones(sb, np.float32)) for j in range(0, cols, sb)], axis=1)
    a, b = fmt.affine_blocks(data, w.shape), fmt.affine_blocks(ref, w.shape)
    np.testing.assert_array_equal(a.scale, b.scale)
    diff = np.abs(a.q.astype(int) - b.q.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01  # fp16-stored weights make exact ties common
    err = lambda d: float(((fmt.decode(d, w.shape) - w) ** 2).sum())  # noqa: E731
    assert err(data) <= err(ref) * (1 + 1e-4)  # never worse than the reference rounding


@pytest.mark.parametrize("name", FORMATS + LATTICE)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_calibration_error(layer, name, act_order):
    w, gram = layer
    fmt = get_format(name)
    data = gptq_quantize(w, fmt, gram, act_order=act_order)
    q = gq.dequantize(data, fmt.ggml_type).reshape(w.shape)  # valid llama.cpp bytes
    rtn = fmt.roundtrip(w, torch.diagonal(gram).numpy())
    assert out_err(w, q, gram) < 0.9 * out_err(w, rtn, gram)


def test_gptq_refuses_rows_not_fitting_the_block():
    from haloquant import HaloquantError

    with pytest.raises(HaloquantError, match="multiple of 256"):
        gptq_quantize(np.zeros((4, 288), np.float32), get_format("Q4_K"), torch.eye(288))


@pytest.fixture(scope="module")
def embedding(pipeline_run):
    return calibrated_tensor(pipeline_run, "token_embd.weight")


def test_tied_embedding_gets_gptq_with_the_head_hessian(embedding):
    """ref-llama-tiny ties its head to the embedding: one weight, quantized with GPTQ over the head's
    input, which must lower the head's output error below rounding's."""
    from haloquant.quantizer import encode_tensor
    from haloquant.schemas.params import QuantizeSpec

    t, w, stats = embedding
    assert t.tied
    fmt = get_format("Q6_K")
    gram = stats.gram(t)
    q = fmt.decode(encode_tensor(t, w, fmt, QuantizeSpec(method="gptq"), stats), w.shape)
    rtn = fmt.decode(encode_tensor(t, w, fmt, QuantizeSpec(method="rtn"), stats), w.shape)
    assert out_err(w, q, gram) < 0.9 * out_err(w, rtn, gram)


def test_untied_embedding_stays_round_to_nearest(embedding):
    import dataclasses

    from haloquant.quantizer import encode_tensor
    from haloquant.schemas.params import QuantizeSpec

    t, w, stats = embedding
    untied = dataclasses.replace(t, tied=False)
    fmt = get_format("Q4_K")
    np.testing.assert_array_equal(encode_tensor(untied, w, fmt, QuantizeSpec(method="gptq"), stats),
                                  encode_tensor(untied, w, fmt, QuantizeSpec(method="rtn"), stats))


def test_only_a_shared_head_marks_the_embedding_tied():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=2)
    for tie in (True, False):
        infos = quantizable_tensors(LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=tie)))
        assert [t.tied for t in infos if t.kind == "token_embd"] == [tie]
        assert [t.kind for t in infos].count("output") == (0 if tie else 1)


@pytest.mark.parametrize("fmt_name", ["Q3_K", "Q6_K", "Q4_K"])
def test_dead_columns_do_not_derail_act_order(fmt_name):
    """Input channels that are never active (a widened model's pad channels: zero Gram rows) with the live
    channels' activations small (Gram diagonal < 1, as in Qwen2.5-0.5B): GPTQ with act_order stays as close to
    the weights, in output error, as round-to-nearest. Before the fix the dead columns (diagonal set to 1) were
    ordered first and Q3_K/Q6_K came out 2–3× the weights' norm off."""
    g = torch.Generator().manual_seed(0)
    rows, live, dead = 16, 384, 128
    w = torch.randn(rows, live + dead, generator=g) * 0.05
    w[:, live:] = 0
    x = torch.randn(2048, live, generator=g) * torch.linspace(0.02, 0.5, live)  # diagonal well below 1
    gram = torch.zeros(live + dead, live + dead)
    gram[:live, :live] = x.T @ x / len(x)
    fmt = get_format(fmt_name)
    W = w.numpy()

    def output_error(q):
        e = torch.from_numpy(q - W).double()
        return float(torch.trace(e @ gram.double() @ e.T))

    rtn = output_error(fmt.decode(fmt.encode(W), W.shape))
    gptq = output_error(fmt.decode(gptq_quantize(W, fmt, gram, act_order=True), W.shape))
    assert gptq < rtn, (gptq, rtn)
