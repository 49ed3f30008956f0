"""Widening the residual stream to whole 256-blocks (haloquant/widening.py) on a small model of every
family that allows it: the widened folder computes the float model's logits (1e-4, float32), also
when rotated afterwards; Phi-3 and an already whole width are refused; and a quantized widened
model — k-quants on rows that were too narrow for them — computes in llama.cpp what torch computes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from gguf import GGUFReader

from haloquant import HaloquantError
from haloquant.formats import get_format
from haloquant.modelio import load_model
from haloquant.rotation import write_rotated
from haloquant.schemas.params import ModelSpec, QuantizeSpec
from haloquant.widening import source_weight_ratio, write_widened
from tests.modelzoo import CASES, make_model
from tests.typemap import gguf_and_torch_perplexity, logits, quantize_at_type_map

WIDENABLE = [c for c in CASES if c.family != "phi3"]


def multiple_for(case) -> int:
    """256 where the width is not whole 256-blocks; otherwise 384, so that every case widens."""
    return 256 if case.hidden % 256 else 384


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo-widening")


@pytest.mark.parametrize("case", WIDENABLE, ids=lambda c: c.id)
def test_widened_folder_computes_the_float_modelslogits(case, zoo):
    src = make_model(case, zoo)
    ids = torch.randint(0, 200, (2, 40), generator=torch.Generator().manual_seed(0))
    ref = logits(load_model(src, "cpu").float(), ids)
    out = zoo / f"{case.id}-widened"
    report = write_widened(src, out, multiple_for(case), dtype=torch.float32)
    wide = load_model(out, "cpu")
    D = -(-case.hidden // multiple_for(case)) * multiple_for(case)
    assert report["hidden"] == [case.hidden, D] and wide.config.hidden_size == D
    assert wide.get_input_embeddings().weight.shape[1] == D
    assert (logits(wide, ids) - ref).abs().max() < 1e-4
    assert wide.config.tie_word_embeddings == case.tied
    heads = report["heads"][1]
    assert wide.config.num_attention_heads == heads and heads % case.kv_heads == 0
    hd = case.extra.get("head_dim", case.hidden // case.heads)
    assert heads * hd % multiple_for(case) == 0 or heads == case.heads
    ratio = source_weight_ratio(out)
    assert 0.5 < ratio < 1 and report["weights"]["source"] == round(ratio * report["weights"]["widened"])


@pytest.mark.parametrize("case", [c for c in WIDENABLE if not c.family.startswith("gemma")][:4], ids=lambda c: c.id)
def test_widened_then_rotated_is_exact_and_keeps_the_weight_count(case, zoo):
    src = make_model(case, zoo)
    ids = torch.randint(0, 200, (2, 40), generator=torch.Generator().manual_seed(2))
    ref = logits(load_model(src, "cpu").float(), ids)
    write_widened(src, zoo / f"{case.id}-w", multiple_for(case), dtype=torch.float32)
    write_rotated(zoo / f"{case.id}-w", zoo / f"{case.id}-wr", seed=4, dtype=torch.float32)
    rotated = load_model(zoo / f"{case.id}-wr", "cpu")
    assert (logits(rotated, ids) - ref).abs().max() < 1e-4
    emb = rotated.get_input_embeddings().weight
    assert (emb[:, case.hidden:].abs().sum(1) > 0).all()  # the new channels carry the rotated stream
    assert source_weight_ratio(zoo / f"{case.id}-wr") == source_weight_ratio(zoo / f"{case.id}-w")


def test_refusals_are_clear_and_write_nothing(zoo, tmp_path, capsys):
    from haloquant.flows.cli import main

    phi3 = make_model(next(c for c in CASES if c.family == "phi3" and c.hidden % 256), zoo)
    with pytest.raises(HaloquantError, match="head geometry from hidden_size"):
        write_widened(phi3, tmp_path / "p")
    whole = make_model(next(c for c in WIDENABLE if c.hidden % 256 == 0), zoo)
    assert main(["widen", str(whole), str(tmp_path / "w")]) == 2
    assert "is a multiple of 256 already" in capsys.readouterr().err
    assert main(["widen", str(tmp_path / "missing"), str(tmp_path / "m")]) == 2
    assert "widening source: folder" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    case = next(c for c in WIDENABLE if c.hidden % 256)
    assert main(["widen", str(make_model(case, zoo)), str(tmp_path / "ok")]) == 0
    assert json.loads((tmp_path / "ok" / "widening.json").read_text())["hidden"][0] == case.hidden


@pytest.mark.parametrize("case", [c for c in WIDENABLE if c.id in ("llama-w384-tied", "qwen2-w448-tied",
                                                                    "gemma3-w640-tied")], ids=lambda c: c.id)
def test_quantized_widened_gguf_computes_what_torch_computes(case, zoo):
    """Widened (384 → 512 with 6 → 8 heads, 448 → 512 with 7 → 8, Gemma 3's 640 → 768), GPTQ-quantized
    with Q3_K/Q4_K on every linear reading the stream or the heads, the embedding and down where its rows
    allow: llama.cpp's perplexity within 1 % of torch's on the same decoded weights; the file says the
    widened width, the heads and the checkpoint's head width."""
    folder = zoo / f"{case.id}-widened-q"
    report = write_widened(make_model(case, zoo), folder)
    out = zoo / f"{case.id}-widened-out"
    spec = ModelSpec(path=folder, device="cpu")
    _, type_map = quantize_at_type_map(
        spec, out, lambda i, t: next(f for f in ("Q3_K" if i % 2 else "Q4_K", "Q5_0", "Q8_0")
                                     if get_format(f).supports(t.shape)),
        {"quantize": QuantizeSpec(method="gptq", correct_row_scales=True, correct_input_scales=True)})
    widths = [n for n in type_map if n.endswith(("attn_q.weight", "attn_k.weight", "attn_output.weight",
                                                  "ffn_up.weight", "ffn_gate.weight"))]
    assert widths and all(type_map[n] in ("Q3_K", "Q4_K") for n in widths)  # 256-blocks: new for these widths
    lc, torch_ppl = gguf_and_torch_perplexity(spec, out / "quantize", out / "gguf")
    assert math.isfinite(lc) and abs(lc / torch_ppl - 1) < 0.01, (lc, torch_ppl)
    reader = GGUFReader(out / "gguf" / "model.gguf")
    arch = reader.fields["general.architecture"].contents()
    assert reader.fields[f"{arch}.embedding_length"].contents() == report["hidden"][1]
    assert reader.fields[f"{arch}.attention.key_length"].contents() == case.extra.get("head_dim",
                                                                                      case.hidden // case.heads)
    assert reader.fields[f"{arch}.attention.head_count"].contents() == report["heads"][1]


def test_the_pipeline_widens_when_the_budget_needs_it_and_budgets_the_checkpoints_weights(zoo, tmp_path):
    """A 448-wide Qwen2 at 4.0 bits per weight: infeasible at that width (its stream-reading rows only take
    ≥ 4.5-bit block-32 formats) with rotate.widen false; with the default, auto, the stage widens it and
    the budget is met with k-quants on those rows. The budget counts the checkpoint's weights (the file is
    no larger than 4.0 bpw of them), and validate's gate passes (llama.cpp's perplexity within 1 % of
    torch's). On a 256-wide model rotate.widen true copies nothing."""
    from haloquant.tasks.runner import run_all
    from tests.conftest import small_params, write_params

    case = next(c for c in WIDENABLE if c.id == "qwen2-w448-tied")
    src = make_model(case, zoo)
    kquants = ["Q2_K", "Q3_K", "Q4_K", "Q5_0", "Q8_0"]
    spec = {"model.path": str(src), "allocation.budget": {"bits_per_weight": 4.0}, "sensitivity.formats": kquants,
            "validate.ctx": 128, "model.add_bos": None}
    with pytest.raises(HaloquantError, match="allocation.budget.bits_per_weight: infeasible"):
        run_all(write_params(tmp_path / "plain", small_params(**spec, **{"rotate.widen": False})))
    results = run_all(write_params(tmp_path / "wide", small_params(**spec)))
    record, allocation = results["rotate"], results["allocate"]
    assert results["plan_widening"].widen and "met only widened" in results["plan_widening"].reason
    assert record.widened == [448, 512] and not record.enabled and "widening.json" in record.files
    q_types = {c.format for c in allocation.tensors if c.gguf_name.endswith(("attn_q.weight", "ffn_up.weight"))}
    assert q_types <= {"Q2_K", "Q3_K", "Q4_K"}
    checkpoint = load_model(src, "cpu")
    weights = sum(p.numel() for n, p in checkpoint.named_parameters() if p.ndim == 2)
    assert allocation.used_bytes <= 4.0 * weights / 8 and allocation.bits_per_weight <= 4.0
    report = results["validate"]
    assert report.passed and report.bits_per_weight <= 4.0, report  # the gate: llama.cpp within 1 % of torch
    tiny = run_all(write_params(tmp_path / "tiny", small_params(**{"rotate.widen": True})))
    assert tiny["rotate"].widened is None and not any((tmp_path / "tiny" / "artifacts" / "rotate" / "model").iterdir())


@pytest.mark.parametrize("budget, widened", [
    ({"bits_per_weight": 4.0}, True),  # below the checkpoint's smallest allocation, above the widened one's
    ({"bits_per_weight": 4.8}, False),  # feasible as it is: widening would only cost
    ({"bits_per_weight": 2.0}, False),  # infeasible either way: allocate says so about the checkpoint
    ({"file_mb": 2.4}, True), ({"file_mb": 3.0}, False),  # smallest files: 2.67 MB as it is, 2.13 MB widened
])
def test_widen_auto_widens_exactly_where_the_budget_needs_it(budget, widened, zoo):
    """rotate.widen auto on the 448-wide Qwen2 (k-quants, block-32 fallbacks) against sizes computed from the
    shapes alone; explicit true/false and a whole width decide without the budget."""
    from haloquant.budget import apply_rules, budget_bytes, smallest_bytes
    from haloquant.schemas.params import AllocationSpec, RotateSpec, SensitivitySpec
    from haloquant.budget import sizes_table
    from haloquant.tasks.plan_widening import plan
    from haloquant.modelio import model_skeleton
    from haloquant.widening import widened_skeleton

    src = make_model(next(c for c in WIDENABLE if c.id == "qwen2-w448-tied"), zoo)
    sens = SensitivitySpec(formats=["Q2_K", "Q3_K", "Q4_K", "Q5_0", "Q8_0"])
    alloc = AllocationSpec(budget=budget)
    model = ModelSpec(path=str(src))
    decision = plan(model, RotateSpec(widen="auto"), sens, alloc)
    assert decision.widen is widened and decision.hidden == ([448, 512] if widened else None), decision
    assert (decision.smallest_bits > decision.smallest_bits_widened) and "rotate.widen auto" in decision.reason
    assert plan(model, RotateSpec(widen=True), sens, alloc).widen
    assert not plan(model, RotateSpec(widen=False), sens, alloc).widen
    # the decision's arithmetic, against the sizes a widened copy really has
    weights = sum(p.numel() for p in load_model(src, "cpu").parameters() if p.ndim == 2)
    wide = sizes_table(widened_skeleton(src), sens, weights, 0)
    plain = sizes_table(model_skeleton(src), sens, weights, 0)
    assert plain.checkpoint_weights == weights and abs(wide.checkpoint_weights - weights) <= 1
    if "bits_per_weight" in budget:
        room = budget_bytes(alloc, plain)
        assert (smallest_bytes(apply_rules(alloc, plain)) > room and smallest_bytes(apply_rules(alloc, wide)) <= room) \
            is widened
    phi3 = make_model(next(c for c in CASES if c.family == "phi3" and c.hidden % 256), zoo)
    assert not plan(ModelSpec(path=str(phi3)), RotateSpec(widen="auto"), sens, alloc).widen  # auto never refuses


def test_widening_a_phi3_model_is_refused_before_anything_is_written(zoo, tmp_path):
    """`haloquant run` with rotate.widen on a 384-wide Phi-3: exit 2 naming the field, no traceback, no artifacts."""
    import subprocess
    import sys

    from tests.conftest import REPO, small_params, write_params

    phi3 = make_model(next(c for c in CASES if c.family == "phi3" and c.hidden % 256), zoo)
    params = write_params(tmp_path, small_params(**{"model.path": str(phi3), "rotate.widen": True,
                                                    "model.add_bos": None}))
    r = subprocess.run([sys.executable, "-m", "haloquant.flows.cli", "run", "--params", str(params)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "rotate.widen: widening: llama.cpp's converter derives" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "artifacts").exists()
