"""One model holding every format: llama.cpp loads the GGUF and onnxruntime the ONNX, and both
compute what torch computes from the same decoded weights."""

import math

import pytest
from gguf import GGUFReader

from haloquant.artifacts import write_json
from haloquant.evaluation import score
from haloquant.formats import FORMATS
from haloquant.llamacpp import llama_cpp_perplexity
from haloquant.modelio import load_model, load_tokenizer, quantizable_tensors
from haloquant.onnxrt import onnx_check
from haloquant.quantized import load_quantized_model
from haloquant.textdata import eval_chunks, read_text, tokenize
from haloquant.presets import allocation_from_type_map
from haloquant.schemas.params import FoldSpec, GGUFSpec, ModelSpec, ONNXSpec, QuantizeSpec
from haloquant.tasks.export_gguf import export_gguf
from haloquant.tasks.export_onnx import export_onnx
from haloquant.tasks.quantize import quantize
from haloquant.tasks.scale_fold import scale_fold
from tests.conftest import EVAL_TEXT, TINY

ALL = [f for f in FORMATS if f != "F32"]


def build(pipeline_run, formats: list[str], out):
    """ref-llama-tiny with its tensors in `formats` (cycled), quantized (RTN) and exported to GGUF."""
    spec = ModelSpec(path=TINY, device="cpu", add_bos=True)  # the reference models start with BOS
    infos = quantizable_tensors(load_model(TINY, "cpu"))
    allocation = allocation_from_type_map(
        infos, {t.gguf_name: formats[i % len(formats)] for i, t in enumerate(infos)}, "test")
    write_json(out / "allocate" / "allocation.json", allocation.model_dump())
    scale_fold(spec, FoldSpec(), None, None, out / "scale_fold")
    quantize(spec, QuantizeSpec(), pipeline_run[0] / "artifacts" / "calibrate", out / "allocate", out / "scale_fold",
             out / "quantize")
    export_gguf(spec, GGUFSpec(), out / "quantize", out / "gguf")
    return spec, allocation


@pytest.fixture(scope="module")
def mixed(pipeline_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed")
    spec, allocation = build(pipeline_run, ALL, out)
    export_onnx(spec, ONNXSpec(), out / "quantize", out / "onnx")
    return out, allocation.tensors


def test_gguf_holds_every_format_and_llama_cpp_agrees(mixed):
    out, choices = mixed
    types = {t.name: t.tensor_type.name for t in GGUFReader(out / "gguf" / "model.gguf").tensors}
    assert {types[c.gguf_name] for c in choices} == set(ALL)
    text = read_text(EVAL_TEXT, "eval")
    tok = load_tokenizer(TINY)
    chunks = eval_chunks(tokenize(tok, text), 256, 3, tok.bos_token_id)
    torch_ppl = score(load_quantized_model(TINY, out / "quantize", "cpu"), chunks)["ppl"]
    lc = llama_cpp_perplexity(out / "gguf" / "model.gguf", text, 256, 3)
    assert math.isfinite(lc["ppl"]) and abs(lc["ppl"] / torch_ppl - 1) < 0.01
    # the per-chunk NLLs (paired comparisons in bench/) add up to the reported perplexity
    assert len(lc["chunk_nll"]) == lc["n_chunks"] == 3
    assert math.exp(sum(lc["chunk_nll"]) / lc["n_tokens"]) == pytest.approx(lc["ppl"], rel=1e-12)



def test_llama_cpp_kl_against_f16_matches_torch_kl(mixed, pipeline_run, tmp_path):
    """KL(F16 file ‖ mixed file) in llama.cpp is what torch measures between the float model and
    the decoded weights (F16 rounding aside), and a file against its own log-probs has none."""
    out, _ = mixed
    build(pipeline_run, ["F16"], tmp_path)
    text = read_text(EVAL_TEXT, "eval")
    f16 = llama_cpp_perplexity(tmp_path / "gguf" / "model.gguf", text, 256, 3, keep_logprobs=True)
    assert f16["logprobs"].shape == (3, 127, load_tokenizer(TINY).vocab_size)
    lc = llama_cpp_perplexity(out / "gguf" / "model.gguf", text, 256, 3, reference=f16["logprobs"])
    tok = load_tokenizer(TINY)
    chunks = eval_chunks(tokenize(tok, text), 256, 3, tok.bos_token_id)
    torch_kl = score(load_quantized_model(TINY, out / "quantize", "cpu"), chunks, load_model(TINY, "cpu"))["kl_mean"]
    assert lc["kl"] > 0.01 and lc["kl"] == pytest.approx(torch_kl, rel=0.05)
    assert sum(lc["chunk_kl"]) / lc["n_tokens"] == pytest.approx(lc["kl"], rel=1e-12)
    same = llama_cpp_perplexity(tmp_path / "gguf" / "model.gguf", text, 256, 3, reference=f16["logprobs"])
    assert abs(same["kl"]) < 1e-6


def test_onnx_holds_integer_weights_and_agrees(mixed):
    out, _ = mixed
    import json

    linears = json.loads((out / "onnx" / "export.json").read_text())["linears"]
    kinds = set(linears.values())
    for expected in ("Q2_K: MatMulNBits bits=2 block=16", "Q3_K: MatMulNBits bits=4 block=16",
                     "Q4_K: MatMulNBits bits=4 block=32 + per-block offset", "Q6_K: MatMulNBits bits=8 block=16",
                     "Q4_0: MatMulNBits bits=4 block=32", "Q8_0: MatMulNBits bits=8 block=32",
                     "Q5_1: MatMulNBits bits=8 block=32 + per-block offset",
                     "Q5_K: MatMulNBits bits=8 block=32 + per-block offset",
                     "IQ4_NL: MatMulNBits bits=8 block=32", "IQ4_XS: MatMulNBits bits=8 block=32",
                     "IQ2_XXS: MatMulNBits bits=8 block=32", "IQ2_S: MatMulNBits bits=8 block=16",
                     "IQ3_S: MatMulNBits bits=8 block=32"):
        assert expected in kinds, kinds
    # no quantized weight is left as a float MatMul or Gather: every format has an integer form
    assert all("float" not in how for how in kinds if not how.startswith("F16")), kinds
    assert any("GatherBlockQuantized" in how for how in kinds), kinds  # the embedding too
    tok = load_tokenizer(TINY)
    chunks = eval_chunks(tokenize(tok, read_text(EVAL_TEXT, "eval")), 128, 2, tok.bos_token_id)
    r = onnx_check(out / "onnx" / "model.onnx", chunks, load_quantized_model(TINY, out / "quantize", "cpu"))
    assert r["max_abs_logit_error"] < 1e-3


def test_preset_type_maps_from_the_dry_run(pipeline_run, tmp_path):
    """llama-quantize's dry run gives the type map its real run writes (Q3_K_M), and the map of an
    i-quant preset that it refuses to quantize without an imatrix (IQ2_M): lattice types, each one
    haloquant encodes, and the file that map gives loads in llama.cpp."""
    from haloquant.presets import preset_type_map, preset_type_map_dry

    build(pipeline_run, ["F16"], tmp_path / "f16")
    f16 = tmp_path / "f16" / "gguf" / "model.gguf"
    assert preset_type_map_dry(f16, "Q3_K_M") == preset_type_map(f16, "Q3_K_M", tmp_path / "q3km.gguf")
    iq2m = preset_type_map_dry(f16, "IQ2_M")
    assert {"IQ2_S", "IQ3_S"} <= set(iq2m.values()) and set(iq2m.values()) <= set(FORMATS)
    quantized = [t for t in quantizable_tensors(load_model(TINY, "cpu"))]
    build(pipeline_run, [iq2m[t.gguf_name] for t in quantized], tmp_path / "iq2m")
    text = read_text(EVAL_TEXT, "eval")
    assert math.isfinite(llama_cpp_perplexity(tmp_path / "iq2m" / "gguf" / "model.gguf", text, 256, 2)["ppl"])
