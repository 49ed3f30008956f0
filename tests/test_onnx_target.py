"""The ONNX export budgeted in its own bytes: haloquant/onnx_layout.py's byte accounting is what
the export writes, and `allocation.onnx_budget` gives one allocation whose GGUF and ONNX files both
fit (issue 18: the tiny model at 4.5 bpw, ONNX ≤ 1.15 × GGUF, logits as torch's)."""

from __future__ import annotations

import json

import pytest

from haloquant import HaloquantError
from haloquant.artifacts import read_artifact
from haloquant.modelio import load_tokenizer
from haloquant.onnxrt import onnx_check
from haloquant.quantized import load_quantized_model
from haloquant.schemas.artifacts import SensitivityTable
from haloquant.schemas.params import (AllocationSpec, Budget, FoldSpec, GGUFSpec, ModelSpec, ONNXSpec, QuantizeSpec,
                                      SensitivitySpec)
from haloquant.tasks.allocate import allocate, allocate_bits
from haloquant.tasks.export_gguf import export_gguf
from haloquant.tasks.export_onnx import export_onnx
from haloquant.tasks.quantize import quantize
from haloquant.tasks.scale_fold import scale_fold
from haloquant.tasks.sensitivity import score_sensitivity
from haloquant.textdata import eval_chunks, read_text, tokenize
from tests.conftest import calibrate_tiny, EVAL_TEXT, TINY

SPEC = ModelSpec(path=TINY, device="cpu", add_bos=True)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx_target")
    calibrate_tiny(out / "calibrate", 8, 128)
    score_sensitivity(SPEC, SensitivitySpec(formats=["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1",
                                                     "Q5_0", "IQ4_NL"], metric="output_error"),
                      QuantizeSpec(), out / "calibrate", out / "sensitivity")
    return out


def _build(out, run: str, allocation: AllocationSpec):
    d = out / run
    result = allocate(allocation, out / "sensitivity", d / "allocate")
    scale_fold(SPEC, FoldSpec(), None, None, d / "scale_fold")
    quantize(SPEC, QuantizeSpec(), out / "calibrate", d / "allocate", d / "scale_fold", d / "quantize")
    export_gguf(SPEC, GGUFSpec(), d / "quantize", d / "gguf")
    export_onnx(SPEC, ONNXSpec(), d / "quantize", d / "onnx")
    return result, json.loads((d / "onnx" / "export.json").read_text()), d


def test_onnx_budget_fits_both_files_and_the_export_is_what_was_counted(measured):
    result, export, d = _build(measured, "both", AllocationSpec(budget=Budget(bits_per_weight=4.5), onnx_budget=1.15))
    assert result.used_bytes <= result.budget_bytes and result.onnx_bytes <= result.onnx_budget_bytes
    assert export["weight_bytes"] == result.onnx_bytes  # the accounting is the file's
    gguf_bytes = (d / "gguf" / "model.gguf").stat().st_size
    assert export["bytes"] <= 1.15 * gguf_bytes, (export["bytes"], gguf_bytes)
    assert all("float" not in how for how in export["linears"].values())
    tok = load_tokenizer(TINY)
    chunks = eval_chunks(tokenize(tok, read_text(EVAL_TEXT, "eval")), 128, 2, tok.bos_token_id)
    r = onnx_check(d / "onnx" / "model.onnx", chunks, load_quantized_model(TINY, d / "quantize", "cpu"))
    assert r["max_abs_logit_error"] < 1e-3


def test_onnx_bytes_are_counted_right_for_any_allocation(measured):
    """Without an ONNX budget the allocation picks by GGUF bytes alone (k-quants, offsets, 2-bit
    codes, IQ4 tables): its ONNX count is still the file's, and that file is larger."""
    result, export, d = _build(measured, "gguf_only", AllocationSpec(budget=Budget(bits_per_weight=4.5)))
    assert result.onnx_budget_bytes is None and export["weight_bytes"] == result.onnx_bytes
    assert result.onnx_bytes > 1.15 * result.budget_bytes  # what the ONNX budget is for


def test_an_onnx_budget_that_cannot_be_met_names_the_field(measured):
    table = read_artifact(measured / "sensitivity" / "sensitivity.json", SensitivityTable)
    with pytest.raises(HaloquantError, match="allocation.onnx_budget"):
        allocate_bits(AllocationSpec(budget=Budget(bits_per_weight=4.5), onnx_budget=0.8), table)
    with pytest.raises(HaloquantError, match="allocation.onnx_budget: only solver milp"):
        allocate_bits(AllocationSpec(budget=Budget(bits_per_weight=4.5), onnx_budget=1.2, solver="greedy"), table)


def test_int8_accuracy_level_keeps_the_stored_weights_and_stays_close(measured):
    """export.onnx.accuracy_level 4: every MatMulNBits computes with int8 activations; the codes,
    scales and zero points stored are the exact export's, and the perplexity stays close to it."""
    import onnx
    from onnx import numpy_helper

    _, exact_export, d = _build(measured, "levels", AllocationSpec(budget=Budget(bits_per_weight=4.5)))
    export_onnx(SPEC, ONNXSpec(accuracy_level=4), d / "quantize", d / "onnx_int8")
    exact, int8 = (onnx.load(str(d / f / "model.onnx")) for f in ("onnx", "onnx_int8"))
    levels = [next((a.i for a in n.attribute if a.name == "accuracy_level"), 0)
              for n in int8.graph.node if n.op_type == "MatMulNBits"]
    assert levels and set(levels) == {4}
    assert not any(a.name == "accuracy_level" for n in exact.graph.node for a in n.attribute)
    weights = {i.name: numpy_helper.to_array(i).tobytes() for i in exact.graph.initializer}
    assert weights == {i.name: numpy_helper.to_array(i).tobytes() for i in int8.graph.initializer}
    tok = load_tokenizer(TINY)
    chunks = eval_chunks(tokenize(tok, read_text(EVAL_TEXT, "eval")), 128, 2, tok.bos_token_id)
    quant = load_quantized_model(TINY, d / "quantize", "cpu")
    a, b = (onnx_check(d / f / "model.onnx", chunks, quant) for f in ("onnx", "onnx_int8"))
    assert a["max_abs_logit_error"] < 1e-3 < b["max_abs_logit_error"]  # int8 activations: not exact
    assert abs(b["ppl"] / a["ppl"] - 1) < 0.05, (a["ppl"], b["ppl"])


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_K"])
def test_a_tied_head_read_through_a_transpose_node_is_rewritten_to_codes(fmt):
    """torch's exporter can leave a tied head as MatMul(x, Transpose(embedding)) instead of a folded
    transposed copy (it does when accelerate is installed): the head still becomes MatMulNBits over the
    embedding's codes, the float embedding and its Transpose leave the file, and the logits are the
    decoded weight's."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from haloquant.formats import get_format
    from haloquant.onnx_writer import rewrite_linears
    from haloquant.schemas.artifacts import QuantizedManifest, QuantizedTensor

    vocab, hidden, name = 64, 256, "model.embed_tokens.weight"
    rng = np.random.default_rng(0)
    f = get_format(fmt)
    codes = f.encode(rng.standard_normal((vocab, hidden)).astype(np.float32))
    decoded = f.decode(codes, (vocab, hidden))
    graph = helper.make_graph(
        [helper.make_node("Gather", [name, "ids"], ["embedded"], name="/model/embed_tokens/Gather"),
         helper.make_node("Transpose", [name], ["head_t"], name="/lm_head/Transpose", perm=[1, 0]),
         helper.make_node("MatMul", ["x", "head_t"], ["logits"], name="/lm_head/MatMul")],
        "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 5]),
                 helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, hidden])],
        [helper.make_tensor_value_info("embedded", TensorProto.FLOAT, [1, 5, hidden]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5, vocab])],
        [numpy_helper.from_array(decoded, name)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    manifest = QuantizedManifest(method="rtn", model="tied", tensors_file="t", n_weights=vocab * hidden,
                                 quantized=[QuantizedTensor(name=name, gguf_name="token_embd.weight", format=fmt,
                                                            shape=(vocab, hidden), bytes=codes.nbytes)],
                                 float_tensors=[], total_bytes=codes.nbytes, bits_per_weight=f.bits_per_weight)
    stored, _ = rewrite_linears(model, manifest, {name: codes},
                                {"model.embed_tokens": name, "lm_head": name})
    assert "MatMulNBits" in stored["lm_head"] and "GatherBlockQuantized" in stored["model.embed_tokens"], stored
    assert name not in {i.name for i in model.graph.initializer}
    assert "/lm_head/Transpose" not in {n.name for n in model.graph.node}
    onnx.checker.check_model(model)
    ids, x = rng.integers(0, vocab, (1, 5)), rng.standard_normal((1, 5, hidden)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    embedded, logits = session.run(None, {"ids": ids, "x": x})
    np.testing.assert_allclose(embedded, decoded[ids], atol=1e-5)
    np.testing.assert_allclose(logits, x @ decoded.T, rtol=1e-4, atol=1e-3)
