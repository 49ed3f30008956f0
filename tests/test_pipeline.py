"""The whole pipeline on the real tiny model: artifacts, runtime agreement, failure safety."""

import subprocess
import sys

import pytest
import torch
from gguf import GGUFReader
from safetensors.torch import load_file

from haloquant.artifacts import read_json, sha256_tree
from haloquant.formats import get_format
from haloquant.calibstats import CalibrationStats
from haloquant.modelio import load_model
from tests.conftest import CALIB_TEXT, REPO, TINY, small_params, write_params


def test_pipeline_outputs(pipeline_run):
    folder, _, results = pipeline_run
    art = folder / "artifacts"
    alloc = results["allocate"]
    assert alloc.bits_per_weight <= 5.0 and alloc.used_bytes <= alloc.budget_bytes
    assert len({c.format for c in alloc.tensors}) > 1, "a 5.0 bpw budget mixes formats"
    manifest = results["quantize"]
    assert manifest.bits_per_weight == pytest.approx(alloc.bits_per_weight)
    # the GGUF holds exactly the allocated types
    reader = GGUFReader(art / "export_gguf" / "model.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    for c in alloc.tensors:
        assert types[c.gguf_name] == c.format
    assert all(types[n] == "F32" for n in types if n.endswith("norm.weight"))
    metrics = read_json(art / "validate" / "metrics.json")
    assert 0.9 < metrics["ppl_ratio"] < 1.5 and 0 < metrics["kl_mean"] < 0.2
    assert metrics["gate_passed"] is True
    # every perplexity beside what it was measured on: onnxruntime scores fewer chunks
    v = results["validate"]
    assert (metrics["chunks"], metrics["tokens"]) == (v.n_chunks, v.n_tokens_scored) == (4, 4 * 127)
    assert (metrics["llama_cpp_chunks"], metrics["llama_cpp_tokens"]) == (4, 4 * 127)
    ort = v.runtimes["onnxruntime"]
    assert (metrics["onnxruntime_chunks"], metrics["onnxruntime_tokens"]) == (ort["n_chunks"], ort["n_tokens"]) \
        == (4, 4 * 127)  # validate.onnx_chunks: 4
    assert metrics["ppl_quant_on_onnxruntime_chunks"] == ort["torch_ppl_same_chunks"]


def test_llama_cpp_agrees_with_torch(pipeline_run):
    """The GGUF loads in llama.cpp, tokenizes identically, and its perplexity is torch's within 1 %."""
    _, _, results = pipeline_run
    lc = results["validate"].runtimes["llama_cpp"]
    assert lc["same_tokens_as_torch"] is True
    assert lc["n_tokens"] == results["validate"].n_tokens_scored
    assert abs(lc["ppl"] / results["validate"].ppl_quant - 1) < 0.01


def test_onnx_agrees_with_torch(pipeline_run):
    folder, _, results = pipeline_run
    ort = results["validate"].runtimes["onnxruntime"]
    assert ort["max_abs_logit_error"] < 1e-3
    assert ort["ppl"] == pytest.approx(ort["torch_ppl_same_chunks"], rel=1e-4)
    report = read_json(folder / "artifacts" / "export_onnx" / "export.json")
    assert any("MatMulNBits bits=4" in v for v in report["linears"].values())


def test_gram_statistics_match_activations(pipeline_run):
    """stats.safetensors holds E[xxᵀ] of the real inputs; the output error uses it correctly."""
    folder, params_file, results = pipeline_run
    from haloquant.modelio import load_tokenizer
    from haloquant.textdata import calibration_batch, read_text, tokenize

    cal = results["calibrate"]
    stats = load_file(str(folder / "artifacts" / "calibrate" / "stats.safetensors"))
    model = load_model(TINY, "cpu")
    tok = load_tokenizer(TINY)
    batch = calibration_batch(tokenize(tok, read_text(CALIB_TEXT, "t")), cal.n_sequences, cal.seq_len, cal.seed,
                              tok.bos_token_id)
    assert torch.equal(batch, stats["calibration_ids"])  # the artifact keeps the windows it was computed on
    captured = []
    layer = model.model.layers[2].mlp.down_proj
    h = layer.register_forward_pre_hook(lambda m, a: captured.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(batch)
    h.remove()
    x = torch.cat(captured).double()
    key = cal.input_of["model.layers.2.mlp.down_proj"]
    assert f"{key}.gram" not in stats  # the blocks' Hessians are rebuilt per block, not kept (issue 14)
    gram = CalibrationStats(folder / "artifacts" / "calibrate", model=model).gram_of(key)
    torch.testing.assert_close(gram.double(), x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats[f"{key}.sq_mean"].double(), (x * x).mean(0), rtol=1e-4, atol=1e-6)
    # sensitivity error == mean squared output error of quantizing that weight alone
    sens = read_json(folder / "artifacts" / "sensitivity" / "sensitivity.json")
    row = next(t for t in sens["tensors"] if t["name"] == "model.layers.2.mlp.down_proj.weight")
    w = layer.weight.detach().float()
    importance = stats[f"{key}.sq_mean"].numpy()  # quantize.importance is on by default
    q = torch.from_numpy(get_format("Q4_0").roundtrip(w.numpy(), importance))
    direct = ((x.float() @ (w - q).T) ** 2).sum(1).mean().item()
    assert row["candidates"]["Q4_0"]["error"] == pytest.approx(direct, rel=1e-3)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "haloquant.flows.cli", *args], capture_output=True, text=True, cwd=REPO)


@pytest.mark.parametrize("case", ["missing_model", "empty_calibration", "calibration_is_eval", "budget_too_small",
                                  "unknown_key", "wrong_type"])
def test_bad_input_leaves_artifacts_untouched(pipeline_run, tmp_path, case):
    folder, _, _ = pipeline_run
    art = folder / "artifacts"
    before = {p: sha256_tree(p) for p in sorted(art.rglob("*")) if p.is_file()}
    empty = tmp_path / "empty.raw"
    empty.write_text("")
    data, stage, expect = {
        "missing_model": (small_params(**{"model.path": str(tmp_path / "no-model")}), "calibrate", "model.path"),
        "empty_calibration": (small_params(**{"calibration.text": str(empty)}), "calibrate", "calibration.text"),
        "calibration_is_eval": (small_params(**{"calibration.text": small_params()["validate"]["text"]}),
                                "calibrate", "calibration.text"),
        "budget_too_small": (small_params(**{"allocation.budget": {"bits_per_weight": 3.0}}), "allocate",
                             "needs 4.5000 bits per weight"),
        "unknown_key": (small_params(**{"quantize.mode": "rtn"}), "quantize", "quantize.mode"),
        "wrong_type": (small_params(**{"validate.ctx": "long"}), "validate", "validate.ctx"),
    }[case]
    bad = write_params(folder, data, name=f"bad_{case}.yaml")  # same folder → same artifacts root
    try:
        r = run_cli("stage", stage, "--params", str(bad))
    finally:
        bad.unlink()
    assert r.returncode == 2, r.stdout + r.stderr
    assert expect in r.stderr
    after = {p: sha256_tree(p) for p in sorted(art.rglob("*")) if p.is_file()}
    assert after == before


def test_kl_calibrated_sensitivity(pipeline_run, tmp_path):
    """kl_calibrated keeps each tensor's error curve and puts it in KL units by a measurement."""
    from haloquant.schemas.params import ModelSpec, QuantizeSpec, SensitivitySpec
    from haloquant.tasks.sensitivity import score_sensitivity

    folder, _, results = pipeline_run
    raw = results["sensitivity"]
    table = score_sensitivity(ModelSpec(path=TINY, device="cpu", add_bos=True),
                              SensitivitySpec(formats=raw.formats, metric="kl_calibrated", kl_sequences=2),
                              QuantizeSpec(), folder / "artifacts" / "calibrate", tmp_path)
    assert (tmp_path / "sensitivity.json").is_file()
    for r, k in zip(raw.tensors, table.tensors):
        assert r.name == k.name
        ratio = {f: k.candidates[f].error / r.candidates[f].error for f in r.candidates if r.candidates[f].error > 0}
        # one positive scale per tensor: the curve's shape is kept
        assert min(ratio.values()) > 0
        assert max(ratio.values()) == pytest.approx(min(ratio.values()), rel=1e-6)
    # at 4 bits a KL of one tensor alone is small but measurable
    q4 = [t.candidates["Q4_0"].error for t in table.tensors]
    assert 0 < max(q4) < 0.5


def test_gate_fails_the_run_and_keeps_the_report(pipeline_run, tmp_path):
    import shutil

    folder, _, _ = pipeline_run
    shutil.copytree(folder / "artifacts", tmp_path / "artifacts")
    strict = write_params(tmp_path, small_params(**{"validate.gate": {"max_ppl_ratio": 1.0000001, "max_kl": 1e-6}}))
    r = run_cli("stage", "validate", "--params", str(strict))
    assert r.returncode == 2
    assert "validate.gate failed" in r.stderr and "max_kl" in r.stderr
    report = read_json(tmp_path / "artifacts" / "validate" / "report.json")
    assert report["passed"] is False and report["gate"]["max_kl"]["passed"] is False
    assert read_json(tmp_path / "artifacts" / "validate" / "metrics.json")["gate_passed"] is False
