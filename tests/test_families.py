"""Conformance of every registered family (tests/modelzoo.py: widths that are a multiple of 256 and
widths that are not, tied and untied heads, real tokenizers of the family's kind, random weights):
the exported GGUF loads in llama.cpp, tokenizes like the model's own tokenizer, computes what torch
computes from the same decoded weights, carries the model's chat template; the ONNX export agrees
with torch; Scale-Fold's folds are exact; and the default pipeline runs end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from gguf import GGUFReader

from haloquant.artifacts import write_json
from haloquant.evaluation import score
from haloquant.families import FAMILIES
from haloquant.folding import apply_fold, fold_groups
from haloquant.formats import get_format
from haloquant.llamacpp import llama_cpp_perplexity, llama_cpp_tokens
from haloquant.modelio import load_model, load_tokenizer, quantizable_tensors
from haloquant.onnxrt import genai_greedy, onnx_check, torch_greedy
from haloquant.presets import allocation_from_type_map
from haloquant.quantized import load_quantized_model
from haloquant.textdata import eval_chunks, read_text, sequence_bos, tokenize
from haloquant.schemas.params import CalibrationSpec, FoldSpec, GGUFSpec, ModelSpec, ONNXSpec, QuantizeSpec
from haloquant.tasks.calibrate import calibrate
from haloquant.tasks.export_gguf import export_gguf
from haloquant.tasks.export_onnx import export_onnx
from haloquant.tasks.quantize import quantize
from haloquant.tasks.scale_fold import scale_fold
from tests.conftest import CALIB_TEXT, EVAL_TEXT, small_params, write_params
from tests.modelzoo import CASES, make_model

# per tensor, the first of these its rows fit, in turn: k-quants where the width allows, llama.cpp's
# block-32 fallbacks where it does not
FORMATS = ["Q4_K", "Q5_0", "Q6_K", "IQ4_NL", "Q8_0", "Q4_1", "Q3_K", "Q5_1"]
CTX, CHUNKS = 128, 3


def test_every_registered_family_has_a_case():
    assert {c.family if c.family != "mistral" else "llama" for c in CASES} == {f.name for f in FAMILIES.values()}
    assert {c.hidden % 256 == 0 for c in CASES} == {True, False}
    assert {c.tied for c in CASES} == {True, False}


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.id)
def exported(request, zoo):
    """The case's model with GPTQ-quantized mixed formats (and the statistics corrections), exported to GGUF and
    ONNX."""
    case = request.param
    folder = make_model(case, zoo)
    out = zoo / f"{case.id}-out"
    spec = ModelSpec(path=folder, device="cpu")
    calibrate(spec, CalibrationSpec(text=CALIB_TEXT, n_sequences=4, seq_len=64), out / "calibrate")
    infos = quantizable_tensors(load_model(folder, "cpu"))
    type_map = {}
    for i, t in enumerate(infos):
        fits = [f for f in FORMATS if get_format(f).supports(t.shape)]
        type_map[t.gguf_name] = fits[i % len(fits)]
    write_json(out / "allocate" / "allocation.json", allocation_from_type_map(infos, type_map, "test").model_dump())
    scale_fold(spec, FoldSpec(), out / "calibrate", out / "allocate", out / "scale_fold")
    # with both statistics corrections, so that what they change (scale fields of v/up rows, norm weights, a
    # rescaled bias) is checked in llama.cpp and onnxruntime for every family
    quantize(spec, QuantizeSpec(method="gptq", correct_row_scales=True, correct_input_scales=True), out / "calibrate",
             out / "allocate", out / "scale_fold", out / "quantize")
    export_gguf(spec, GGUFSpec(), out / "quantize", out / "gguf")
    export_onnx(spec, ONNXSpec(), out / "quantize", out / "onnx")
    return case, folder, out, type_map


def _chunks(folder):
    tok = load_tokenizer(folder)
    text = read_text(EVAL_TEXT, "eval")
    bos = sequence_bos(tok, None)
    return text, tok, bos, eval_chunks(tokenize(tok, text), CTX, CHUNKS, bos)


def test_gguf_holds_the_types_and_loads_in_llama_cpp(exported):
    case, folder, out, type_map = exported
    types = {t.name: t.tensor_type.name for t in GGUFReader(out / "gguf" / "model.gguf").tensors}
    for name, fmt in type_map.items():
        assert types[name] == fmt
    if case.hidden % 256:  # k-quants do not fit these rows: the fallbacks are really used
        assert {"Q5_0", "IQ4_NL", "Q4_1"} & set(types.values())


def test_llama_cpp_tokenizes_like_the_model_tokenizer(exported):
    case, folder, out, _ = exported
    tok = load_tokenizer(folder)
    text = read_text(EVAL_TEXT, "eval")[:20000]
    ids, adds_bos = llama_cpp_tokens(out / "gguf" / "model.gguf", text)
    hf = tok(text)["input_ids"]  # the model's own tokenizer, its special tokens included
    assert ids == hf
    assert adds_bos == (sequence_bos(tok, None) is not None)
    chat = tok.apply_chat_template([{"role": "user", "content": "Name a river."}], tokenize=False,
                                   add_generation_prompt=True)
    special_ids, _ = llama_cpp_tokens(out / "gguf" / "model.gguf", chat, special=True)
    assert special_ids == tok(chat, add_special_tokens=False)["input_ids"] or \
        special_ids == tok(chat)["input_ids"]


def test_gguf_carries_the_chat_template(exported):
    case, folder, out, _ = exported
    reader = GGUFReader(out / "gguf" / "model.gguf")
    template = reader.fields["tokenizer.chat_template"].contents()
    assert template == load_tokenizer(folder).chat_template


def test_llama_cpp_computes_what_torch_computes(exported):
    case, folder, out, _ = exported
    text, tok, bos, chunks = _chunks(folder)
    torch_ppl = score(load_quantized_model(folder, out / "quantize", "cpu"), chunks)["ppl"]
    lc = llama_cpp_perplexity(out / "gguf" / "model.gguf", text, CTX, CHUNKS)
    assert lc["bos_id"] == bos
    assert math.isfinite(lc["ppl"]) and abs(lc["ppl"] / torch_ppl - 1) < 0.01, (lc["ppl"], torch_ppl)


def test_onnx_agrees_with_torch(exported):
    case, folder, out, _ = exported
    _, _, _, chunks = _chunks(folder)
    r = onnx_check(out / "onnx" / "model.onnx", chunks[:1, :64], load_quantized_model(folder, out / "quantize", "cpu"))
    assert r["max_abs_logit_error"] < 1e-3, r


def test_onnxruntime_genai_generates_what_torch_generates(exported):
    """The export folder is an onnxruntime-genai model: its generator (KV cache, genai_config.json)
    greedily continues a prompt with the same 16 tokens as torch on the same quantized weights, and
    its tokenizer and chat template are the model's."""
    import onnxruntime_genai as og

    case, folder, out, _ = exported
    tok = load_tokenizer(folder)
    text = read_text(EVAL_TEXT, "eval")[:2000]
    prompt = tok(text)["input_ids"][:24]
    expected = torch_greedy(load_quantized_model(folder, out / "quantize", "cpu"), prompt, 16)
    assert len(expected) == 16 and genai_greedy(out / "onnx", prompt, 16) == expected
    genai_tok = og.Tokenizer(og.Model(str(out / "onnx")))
    # the generator's tokenizer adds no BOS of its own: a prompt's BOS comes from the chat template
    assert [int(i) for i in genai_tok.encode(text)] == tok(text, add_special_tokens=False)["input_ids"]
    messages = [{"role": "user", "content": "Name a river."}]
    chat = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert genai_tok.apply_chat_template(json.dumps(messages), add_generation_prompt=True) == chat
    assert [int(i) for i in genai_tok.encode(chat)] == tok(chat, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_scale_folds_are_exact(case, zoo):
    model = load_model(make_model(case, zoo), "cpu")
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    groups = fold_groups(model)
    assert {g.source_kind for g in groups} == {"norm", "rows"}
    with torch.no_grad():
        before = model(ids).logits
        for g in groups:
            src = dict(model.named_parameters())[g.source] if g.source_kind == "norm" else \
                dict(model.named_modules())[g.source].weight[g.rows]
            apply_fold(model, g, torch.exp(0.5 * torch.randn(src.shape[0], generator=gen)))
        after = model(ids).logits
    assert (after - before).abs().max() / before.abs().max() < 1e-4


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_block_hessians_are_the_full_forward_passes(case, zoo, tmp_path):
    """The calibrate artifact keeps no decoder-block Gram matrix; rebuilt one block at a time from
    its windows (haloquant/layergrams.py), each equals, to the last bit, the E[xxᵀ] that hooks on
    the whole model's forward pass accumulate — in one pass when asked in model order."""
    from safetensors.torch import load_file

    from haloquant.calibstats import CalibrationStats

    folder = make_model(case, zoo)
    calibrate(ModelSpec(path=folder, device="cpu"), CalibrationSpec(text=CALIB_TEXT, n_sequences=12, seq_len=32),
              tmp_path)
    model = load_model(folder, "cpu")
    stats = CalibrationStats(tmp_path, model=model)
    kept = load_file(str(tmp_path / "stats.safetensors"))
    keys = sorted(set(stats.report.input_of.values()) - {stats.report.input_of[stats.report.output_head]})
    assert keys and not any(f"{k}.gram" in kept for k in keys)
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}

    def hook(key):
        def fn(_m, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[key] = sums[key] + x.T @ x if key in sums else x.T @ x
        return fn

    handles = [modules[k].register_forward_pre_hook(hook(k)) for k in keys]
    ids = kept["calibration_ids"]
    with torch.no_grad():
        for s in range(0, ids.shape[0], 8):  # the calibrate stage's micro-batches
            model(ids[s : s + 8])
    for h in handles:
        h.remove()
    order = [k for k in stats.report.input_of.values() if k in keys]  # model order, with repeats
    for k in order:
        assert torch.equal(stats.gram_of(k), (sums[k] / ids.numel()).float()), k
        torch.testing.assert_close(torch.diagonal(stats.gram_of(k)), kept[f"{k}.sq_mean"], rtol=1e-6, atol=0)
    assert stats._blocks.passes == 1
    stats.gram_of(order[0])  # an earlier block again: a second pass from block 0
    assert stats._blocks.passes == 2


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kl_probe_replaying_earlier_blocks_is_exact(case, zoo):
    """The sensitivity probe skips the blocks before a weight's own (replaying the float run's
    outputs): for every weight, the same KL to the last bit as the full forward pass."""
    from haloquant.tasks.sensitivity import KLProbe

    model = load_model(make_model(case, zoo), "cpu")
    probe = KLProbe(model, torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0)))
    params = dict(model.named_parameters(remove_duplicate=False))
    gen = torch.Generator().manual_seed(1)
    starts, kls = set(), []
    for t in quantizable_tensors(model):
        w = params[t.name].detach()
        noisy = w + 0.5 * w.std() * torch.randn(w.shape, generator=gen)
        start = probe.first_block(t)
        starts.add(start)
        replayed, full = probe.kl(t.name, noisy, start), probe.kl(t.name, noisy, 0)
        assert replayed == full, (t.name, start, replayed, full)
        kls.append(full)
    assert starts >= {0, 1} and max(kls) > 0  # the replay really ran, and the swaps changed the output
    with torch.no_grad():  # and left the model as it was
        assert torch.equal(model(probe.batch).logits.float().flatten(0, 1), probe.ref_logits)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kl_fisher_is_the_measured_kl_to_second_order(case, zoo):
    """kl_fisher's cost of a small weight error is the KL the probe measures with that error
    swapped in — for every tensor of every family: fused projections, biases, Gemma's scaled
    embedding and soft-capped logits, tied and untied heads."""
    from haloquant.families import family
    from haloquant.fisher import fisher_lookup_error, fisher_output_error, output_fisher
    from haloquant.tasks.sensitivity import KLProbe, linear_of

    model = load_model(make_model(case, zoo), "cpu")
    # tokens of text, not the padding row (zero: an RMSNorm of a zero vector is all curvature)
    real = (model.get_input_embeddings().weight.norm(dim=1) > 0).nonzero().flatten()
    ids = real[torch.randint(0, len(real), (8, 32), generator=torch.Generator().manual_seed(0))]
    infos = quantizable_tensors(model)
    linear = {t.name: linear_of(model, t) for t in infos if linear_of(model, t) is not None}
    fisher = output_fisher(model, ids, sorted(set(linear.values())))
    named, grams, handles = dict(model.named_modules()), {}, []
    for m in set(linear.values()):
        def keep(_mod, args, m=m):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[m] = x.T @ x / x.shape[0]  # one forward pass: E[xxᵀ] over all its tokens
        handles.append(named[m].register_forward_pre_hook(keep))
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in handles:
        h.remove()
    freq = torch.bincount(ids.flatten(), minlength=model.config.vocab_size).double() / ids.numel()
    probe = KLProbe(model, ids)
    params = dict(model.named_parameters(remove_duplicate=False))
    gen = torch.Generator().manual_seed(1)
    pairs = {}  # tensor → (kl_fisher's estimate, the probe's measured KL)
    for t in infos:
        w = params[t.name].detach().double()
        delta = 0.03 * w.std() * torch.randn(w.shape, generator=gen, dtype=torch.float64)
        est = 0.0
        if t.name in linear:
            m = linear[t.name]
            est += fisher.coherence[m] * fisher_output_error(delta, grams[m], fisher.channels[m].double())
        if t.kind == "token_embd":
            scale = family(model).embedding_scale(model.config) ** 2
            est += scale * fisher_lookup_error(delta, freq, fisher.block0.double())
        pairs[t.gguf_name] = (est, probe.kl(t.name, (w + delta).float(), probe.first_block(t)))
    entropy = float(-(probe.ref_p * F.log_softmax(probe.ref_logits, -1)).sum(-1).mean())
    if entropy < 1e-6:  # a random model certain of every next token: no KL to measure, none estimated
        assert all(abs(e) < 1e-6 and abs(k) < 1e-6 for e, k in pairs.values()), pairs
        return
    ratios = {name: e / k for name, (e, k) in pairs.items()}
    outliers = {k: round(r, 3) for k, r in ratios.items() if not 1 / 3 < r < 3}  # second order, one label sample
    assert not outliers, str(outliers)
    mean_ratio = math.exp(sum(map(math.log, ratios.values())) / len(ratios))
    assert 2 / 3 < mean_ratio < 1.5, mean_ratio  # no bias beyond the noise of one label sample


@pytest.mark.parametrize("case", [c for c in CASES if c.hidden % 256], ids=lambda c: c.id)
def test_default_pipeline_runs_at_any_width(case, zoo, tmp_path):
    """The default spec (k-quant candidates; llama.cpp's fallbacks where the rows need them), only
    model.path changed: end to end, validated in llama.cpp and onnxruntime."""
    from haloquant.tasks.runner import run_all

    params = small_params(**{"model.path": str(make_model(case, zoo)), "model.add_bos": None,
                             "sensitivity": {"formats": ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"],
                                             "kl_sequences": 2},
                             "allocation.budget": {"bits_per_weight": 5.0}, "validate.ctx": CTX,
                             "validate.max_chunks": 8, "validate.gate": {"max_runtime_ppl_gap": 0.01}})
    results = run_all(write_params(tmp_path, params))
    v = results["validate"]
    assert v.passed and v.runtimes["llama_cpp"]["same_tokens_as_torch"]
    assert v.runtimes["onnxruntime"]["max_abs_logit_error"] < 1e-3
    formats = {c.format for c in results["allocate"].tensors}
    assert formats & {"IQ4_NL", "Q4_0", "Q4_1", "Q5_0", "Q5_1"}, formats
