"""Scale-Fold: exact in float, never worse after quantization, and runnable in llama.cpp."""

import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from haloquant import HaloquantError
from haloquant.artifacts import read_json
from haloquant.folding import apply_fold, fold_groups, load_folds
from haloquant.modelio import load_model
from tests.conftest import SHARED_A, TINY, small_params, write_params


def random_gqa_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=192, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # non-trivial norms, as in a trained model
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 2.0)
    return model


def fold_everything_randomly(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for g in fold_groups(model):
        if g.source_kind == "norm":
            n = dict(model.named_parameters())[g.source].numel()
        else:
            n = dict(model.named_modules())[g.source].weight[g.rows].shape[0]
        apply_fold(model, g, torch.exp(torch.randn(n, generator=gen) * 1.0))


@pytest.mark.parametrize("which", ["tiny", "ref-llama-a", "random-gqa"])
def test_folding_is_exact(which):
    if which == "random-gqa":
        model = random_gqa_model()
    else:
        path = TINY if which == "tiny" else SHARED_A
        if not path.exists():
            pytest.skip(f"{path} not present")
        model = load_model(path, "cpu")
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        fold_everything_randomly(model)
        after = model(ids).logits
    rel = (after - before).abs().max() / before.abs().max()
    assert rel < 1e-4, rel
    if which == "random-gqa":  # the v→o fold really used per-kv-head scales
        assert model.config.num_key_value_heads < model.config.num_attention_heads


def test_unknown_architecture_is_refused():
    model = random_gqa_model()
    model.config.architectures = ["GPTNeoXForCausalLM"]
    with pytest.raises(HaloquantError, match="architecture 'GPTNeoXForCausalLM' is not supported; supported: "
                                             "Gemma2ForCausalLM, .*LlamaForCausalLM"):
        fold_groups(model)


@pytest.fixture(scope="module")
def folded(pipeline_run, tmp_path_factory):
    from haloquant.tasks.runner import run_stage

    folder, _, _ = pipeline_run
    out = tmp_path_factory.mktemp("folded")
    shutil.copytree(folder / "artifacts", out / "artifacts")
    params = write_params(out, small_params(**{"fold": {"method": "scale", "alpha_grid": [0.0, 0.25, 0.5]},
                                               "allocation.budget": {"bits_per_weight": 4.75},
                                               # the norms as folded: no input-scale correction on top
                                               "quantize.correct_input_scales": False}))
    results = {s: run_stage(s, params) for s in ("allocate", "scale_fold", "quantize", "export_gguf", "export_onnx",
                                                 "validate")}
    return out, results


def test_alpha_search_never_increases_quantized_error(folded):
    _, results = folded
    groups = results["scale_fold"].groups
    assert groups and all(g["error_folded"] <= g["error_unfolded"] for g in groups)
    assert any(g["alpha"] > 0 for g in groups), "no group profited from folding"
    # where the input had outliers to migrate (a channel ≥ 2× the typical one), α ≥ 0.5 flattens it;
    # on an already flat input (ratio ≈ 1.4) the weights' own maxima set the scales and may raise it
    # slightly — such a fold is kept only because it lowered the quantized error (asserted above)
    with_outliers = [g for g in groups if g["alpha"] >= 0.5 and g["before"]["channel_max_ratio"] >= 2]
    assert with_outliers and all(g["after"]["channel_max_ratio"] < g["before"]["channel_max_ratio"]
                                 for g in with_outliers)


def test_folded_model_runs_in_llama_cpp_and_onnxruntime(folded):
    out, results = folded
    v = results["validate"]
    assert v.runtimes["llama_cpp"]["ppl_gap_vs_torch"] < 0.01
    assert v.runtimes["onnxruntime"]["max_abs_logit_error"] < 1e-3
    assert v.ppl_ratio < 1.5


def test_quantized_artifact_holds_folded_norms(folded):
    out, results = folded
    from safetensors.numpy import load_file

    tensors = load_file(str(out / "artifacts" / "quantize" / "tensors.safetensors"))
    model = load_model(TINY, "cpu")
    scales = load_folds(model, out / "artifacts" / "scale_fold")
    assert scales  # something was folded
    for name in read_json(out / "artifacts" / "quantize" / "quantized.json")["float_tensors"]:
        torch.testing.assert_close(torch.from_numpy(tensors[name]), dict(model.named_parameters())[name].detach())
