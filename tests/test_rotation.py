"""Kernel-free residual rotation (haloquant/rotation.py) on a small model of every registered family:
the rotated folder computes the float model's logits (1e-4, float32), a tied head is untied, an
outlier channel is spread, Gemma's post-norms are refused, and a quantized rotated model's GGUF
computes in llama.cpp what torch computes from the same decoded weights."""

from __future__ import annotations

import json
import math

import pytest
import torch
from gguf import GGUFReader
from safetensors.torch import load_file

from haloquant import HaloquantError
from haloquant.families import family
from haloquant.formats import get_format
from haloquant.modelio import load_model
from haloquant.rotation import randomized_hadamard, rotate_model, write_rotated
from haloquant.schemas.params import ModelSpec, QuantizeSpec
from tests.modelzoo import CASES, make_model
from tests.typemap import gguf_and_torch_perplexity, logits, quantize_at_type_map

ROTATABLE = [c for c in CASES if not c.family.startswith("gemma")]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo-rotation")


@pytest.mark.parametrize("n", [1, 3, 64, 96, 384, 576, 896, 3072])
def test_randomized_hadamard_is_orthogonal(n):
    q = randomized_hadamard(n, seed=7)
    assert torch.allclose(q.T @ q, torch.eye(n, dtype=torch.float64), atol=1e-12)
    if n & (n - 1) == 0 and n > 1:  # a pure Hadamard: every entry ±1/√n, one channel spread over all
        assert torch.allclose(q.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64))


@pytest.mark.parametrize("case", ROTATABLE, ids=lambda c: c.id)
def test_rotated_folder_computes_the_float_modelslogits(case, zoo):
    src = make_model(case, zoo)
    ids = torch.randint(0, 200, (2, 40), generator=torch.Generator().manual_seed(0))
    ref = logits(load_model(src, "cpu").float(), ids)
    report = write_rotated(src, zoo / f"{case.id}-rotated", dtype=torch.float32)
    rotated = load_model(zoo / f"{case.id}-rotated", "cpu")
    assert (logits(rotated, ids) - ref).abs().max() < 1e-4
    assert report["untied_head"] == case.tied and not rotated.config.tie_word_embeddings
    assert rotated.get_output_embeddings().weight.data_ptr() != rotated.get_input_embeddings().weight.data_ptr()
    assert json.loads((zoo / f"{case.id}-rotated" / "rotation.json").read_text())["hidden"] == case.hidden
    fam = family(rotated)
    norms = [p for n, p in rotated.named_parameters() if any(f".{f.norm}." in n for f in fam.norm_feeds)]
    assert norms and all(torch.all(p == 1.0) for p in norms)  # folded into the linears that read them
    original = load_model(src, "cpu").float()
    q_name = f"{fam.layer(0)}.{fam.norm_feeds[0].linears[0]}.weight"
    assert not torch.allclose(dict(rotated.named_parameters())[q_name], dict(original.named_parameters())[q_name])


@pytest.mark.parametrize("case", [c for c in CASES if c.family.startswith("gemma")][:2], ids=lambda c: c.id)
def test_post_norm_families_are_refused(case, zoo):
    folder = make_model(case, zoo)
    with pytest.raises(HaloquantError, match="post-norms"):
        rotate_model(load_model(folder, "cpu"))
    with pytest.raises(HaloquantError, match="post-norms"):
        write_rotated(folder, zoo / f"{case.id}-refused")
    assert not (zoo / f"{case.id}-refused").exists()


def test_cli_rotates_and_refuses_clearly(zoo, tmp_path, capsys):
    from haloquant.flows.cli import main

    gemma = make_model(next(c for c in CASES if c.family.startswith("gemma")), zoo)
    assert main(["rotate", str(gemma), str(tmp_path / "g")]) == 2
    assert "post-norms" in capsys.readouterr().err and not (tmp_path / "g").exists()
    assert main(["rotate", str(tmp_path / "missing"), str(tmp_path / "m")]) == 2
    assert "rotation source: folder" in capsys.readouterr().err
    assert main(["rotate", str(make_model(ROTATABLE[0], zoo)), str(tmp_path / "r"), "--float32"]) == 0
    assert json.loads((tmp_path / "r" / "rotation.json").read_text())["dtype"] == "float32"


def test_a_bf16_checkpoint_stays_bf16(zoo):
    """Rotated tensors keep a 16-bit checkpoint's dtype: the file stays as small, and the function moves
    only by bf16's rounding of the rotated weights."""
    from safetensors import safe_open

    case = next(c for c in ROTATABLE if c.dtype == "bfloat16")
    src = make_model(case, zoo)
    out = zoo / f"{case.id}-rotated-bf16"
    write_rotated(src, out)
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    ids = torch.randint(0, 200, (2, 40), generator=torch.Generator().manual_seed(0))
    ref, got = logits(load_model(src, "cpu"), ids), logits(load_model(out, "cpu"), ids)
    assert (got - ref).abs().max() < 0.05 * ref.abs().max(), float((got - ref).abs().max())


def test_an_outlier_channel_is_spread(zoo):
    """A residual channel 40× louder (its input-norm weight) makes one column of q/k/v dominate; after
    the rotation that column's weight is spread evenly over the others."""
    case = ROTATABLE[0]
    model = load_model(make_model(case, zoo), "cpu").float()
    fam = family(model)
    params = dict(model.named_parameters())
    norm = params[f"{fam.layer(0)}.{fam.norm_feeds[0].norm}.weight"]
    with torch.no_grad():
        norm[5] *= 40
    q_name = f"{fam.layer(0)}.{fam.norm_feeds[0].linears[0]}.weight"

    def column_ratio(w):  # largest column norm over the median one
        c = w.norm(dim=0)
        return float(c.max() / c.median())

    before = column_ratio(params[q_name] * norm[None, :])  # the weight the quantizer would see with the norm folded
    rotate_model(model)
    after = column_ratio(dict(model.named_parameters())[q_name])
    assert before > 20 and after < 2, (before, after)


@pytest.mark.parametrize("case", [c for c in ROTATABLE if c.id in ("llama-w384-tied", "qwen2-w256-untied", "phi3-w384-untied")],
                         ids=lambda c: c.id)
def test_quantized_rotated_gguf_computes_what_torch_computes(case, zoo):
    """Rotated, GPTQ-quantized (k-quants where the rows allow, block-32 formats elsewhere, both statistics
    corrections), exported: llama.cpp's perplexity within 1 % of torch's on the same decoded weights, the
    head stored apart from the embedding."""
    folder = zoo / f"{case.id}-rotated-q"
    write_rotated(make_model(case, zoo), folder, seed=3)
    out = zoo / f"{case.id}-rotated-out"
    spec = ModelSpec(path=folder, device="cpu")
    quantize_at_type_map(spec, out, lambda i, t: next(f for f in ("Q4_K", "Q5_0", "Q6_K", "Q8_0")
                                                      if get_format(f).supports(t.shape)),
                         {"quantize": QuantizeSpec(method="gptq", correct_row_scales=True, correct_input_scales=True)})
    lc, torch_ppl = gguf_and_torch_perplexity(spec, out / "quantize", out / "gguf")
    assert math.isfinite(lc) and abs(lc / torch_ppl - 1) < 0.01, (lc, torch_ppl)
    names = {t.name for t in GGUFReader(out / "gguf" / "model.gguf").tensors}
    assert {"output.weight", "token_embd.weight"} <= names


def test_stream_only_rotation_is_exact_too(zoo):
    """heads=False (`--no-heads`): the residual rotation alone, v/o left in their basis — also the same function."""
    case = next(c for c in ROTATABLE if c.family == "phi3" and c.kv_heads < c.heads)  # fused qkv, GQA
    model = load_model(make_model(case, zoo), "cpu").float()
    ids = torch.randint(0, 200, (2, 40), generator=torch.Generator().manual_seed(1))
    ref = logits(model, ids)
    v_before = model.model.layers[0].self_attn.qkv_proj.weight.detach().clone()
    rotate_model(model, seed=5, heads=False)
    assert (logits(model, ids) - ref).abs().max() < 1e-4
    full = load_model(make_model(case, zoo), "cpu").float()
    rotate_model(full, seed=5, heads=True)
    after, with_heads = model.model.layers[0].self_attn.qkv_proj.weight, full.model.layers[0].self_attn.qkv_proj.weight
    q_rows = case.heads * (case.hidden // case.heads)
    assert torch.allclose(after[:q_rows], with_heads[:q_rows])  # q (and k) rows: the stream's rotation only
    assert not torch.allclose(after[-(q_rows // case.heads * case.kv_heads):], with_heads[-(q_rows // case.heads * case.kv_heads):])
    assert not torch.allclose(after, v_before)


def test_the_pipeline_quantizes_a_rotated_copy_when_asked(pipeline_run, tmp_path):
    """rotate.enabled: the stages after `rotate` read the rotated copy (its calibration statistics are
    the rotated model's, its GGUF has an untied head and the checkpoint's name, llama.cpp agrees with
    torch within 1 %), and validate scores against the checkpoint itself: its float perplexity is the
    unrotated run's. Off (the shared pipeline run): an empty folder, the checkpoint quantized as it is."""
    from gguf import GGUFReader

    from haloquant.tasks.runner import run_all
    from tests.conftest import TINY, small_params, write_params

    plain_folder, _, plain = pipeline_run
    assert not plain["rotate"].enabled and not any((plain_folder / "artifacts" / "rotate" / "model").iterdir())
    results = run_all(write_params(tmp_path, small_params(**{"rotate.enabled": True, "rotate.seed": 1})))
    art = tmp_path / "artifacts"
    record = results["rotate"]
    assert record.enabled and record.untied_head and record.model == TINY.name
    assert set(record.files) >= {"config.json", "rotation.json"}
    assert any(f.endswith(".safetensors") for f in record.files)
    assert json.loads((art / "rotate" / "model" / "config.json").read_text())["tie_word_embeddings"] is False
    assert results["calibrate"].model == results["quantize"].model == TINY.name
    plain_stats = load_file(plain_folder / "artifacts" / "calibrate" / "stats.safetensors")
    stats = load_file(art / "calibrate" / "stats.safetensors")
    key = next(k for k in stats if stats[k].is_floating_point() and stats[k].dim() == 2)
    assert not torch.allclose(stats[key], plain_stats[key], rtol=1e-3)  # the rotated model's activations
    reader = GGUFReader(art / "export_gguf" / "model.gguf")
    assert "output.weight" in {t.name for t in reader.tensors}
    name = reader.fields["general.name"]
    assert bytes(name.parts[name.data[0]]).decode() == TINY.name
    v, v0 = results["validate"], plain["validate"]
    assert v.ppl_float == pytest.approx(v0.ppl_float, rel=1e-6)  # the reference is the checkpoint, not the copy
    assert v.runtimes["llama_cpp"]["ppl_gap_vs_torch"] < 0.01 and v.passed


def test_rotation_of_a_post_norm_family_is_refused_before_anything_is_written(zoo, tmp_path, capsys):
    from haloquant.flows.cli import main
    from tests.conftest import small_params, write_params

    gemma = make_model(next(c for c in CASES if c.family.startswith("gemma")), zoo)
    params = write_params(tmp_path, small_params(**{"model.path": str(gemma), "rotate.enabled": True}))
    assert main(["run", "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert "rotate.enabled: rotation:" in err and "post-norms" in err and "Traceback" not in err
    assert not (tmp_path / "artifacts").exists()
