"""validate: how much quality the budget cost, measured in torch and in the target runtimes.

Torch: perplexity of the float and the quantized model on held-out text (llama-perplexity's
protocol) and mean per-token KL(float ‖ quantized). llama.cpp: perplexity of the exported GGUF,
tokenized by llama.cpp itself — that its tokens (and BOS) are the model tokenizer's is a gate that
always applies. onnxruntime: perplexity of the ONNX export and its largest logit
deviation from torch. A gate in the spec turns any of these into a failed run.
"""

from __future__ import annotations

from pathlib import Path

from haloquant import HaloquantError
from haloquant.artifacts import read_artifact, sha256_file, write_json
from haloquant.evaluation import score
from haloquant.llamacpp import llama_cpp_perplexity, same_tokens_as_torch
from haloquant.modelio import load_model, load_tokenizer
from haloquant.onnxrt import onnx_check
from haloquant.quantized import load_quantized_model, read_quantized
from haloquant.textdata import eval_chunks, read_text, sequence_bos, tokenize
from haloquant.schemas.artifacts import CalibrationReport, ValidationReport
from haloquant.schemas.params import ModelSpec, ValidateSpec

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.json"
PLOT_FILE = "size_ppl.json"


def _gate(spec: ValidateSpec, report: dict) -> dict:
    g = spec.gate
    checks = {}
    if "llama_cpp" in report["runtimes"]:  # always: otherwise the two runtimes score different texts
        same = report["runtimes"]["llama_cpp"]["same_tokens_as_torch"]
        checks["llama_cpp_tokens"] = {"limit": "llama.cpp's tokens and BOS = the model tokenizer's", "value": same,
                                      "passed": same}
    if g.max_ppl_ratio is not None:
        checks["max_ppl_ratio"] = {"limit": g.max_ppl_ratio, "value": report["ppl_ratio"],
                                   "passed": report["ppl_ratio"] <= g.max_ppl_ratio}
    if g.max_kl is not None:
        checks["max_kl"] = {"limit": g.max_kl, "value": report["kl_mean"], "passed": report["kl_mean"] <= g.max_kl}
    if g.max_runtime_ppl_gap is not None and "llama_cpp" in report["runtimes"]:
        gap = report["runtimes"]["llama_cpp"]["ppl_gap_vs_torch"]
        checks["max_runtime_ppl_gap"] = {"limit": g.max_runtime_ppl_gap, "value": gap,
                                         "passed": gap <= g.max_runtime_ppl_gap}
    return checks


def scoped_metrics(report: dict, passed: bool) -> dict:
    """metrics.json (what `dvc metrics show` prints): each perplexity beside the chunks and tokens
    it was measured on, since onnxruntime scores fewer chunks (validate.onnx_chunks) than torch
    and llama.cpp do — and torch's perplexity on those same chunks, to compare it with."""
    m = {k: report[k] for k in ("ppl_float", "ppl_quant", "ppl_ratio", "kl_mean")}
    m.update(chunks=report["n_chunks"], tokens=report["n_tokens_scored"],
             bits_per_weight=report["bits_per_weight"], gguf_bytes=report["gguf_bytes"])
    runtimes = report["runtimes"]
    if "llama_cpp" in runtimes:
        lc = runtimes["llama_cpp"]
        m.update(ppl_llama_cpp=lc["ppl"], llama_cpp_chunks=lc["n_chunks"], llama_cpp_tokens=lc["n_tokens"],
                 llama_cpp_ppl_gap=lc["ppl_gap_vs_torch"])
    if "onnxruntime" in runtimes:
        ort = runtimes["onnxruntime"]
        m.update(ppl_onnxruntime=ort["ppl"], onnxruntime_chunks=ort["n_chunks"], onnxruntime_tokens=ort["n_tokens"],
                 ppl_quant_on_onnxruntime_chunks=ort["torch_ppl_same_chunks"],
                 onnx_max_abs_logit_error=ort["max_abs_logit_error"])
    m["gate_passed"] = passed
    return m


def validate(model_spec: ModelSpec, spec: ValidateSpec, calib_dir: Path, quant_dir: Path, gguf_dir: Path,
             onnx_dir: Path, out_dir: Path, reference: ModelSpec | None = None) -> ValidationReport:
    """`model_spec`: the model that was quantized; `reference`: the float model to score against
    (the checkpoint itself where the stages quantized a rotated copy of it; default: `model_spec`)."""
    text = read_text(spec.text, "validate.text")
    calib = read_artifact(calib_dir / "calibration.json", CalibrationReport)
    if calib.text_sha256 == sha256_file(spec.text):
        raise HaloquantError(f"validate.text: {spec.text} is the calibration text; evaluate on held-out text")
    tokenizer = load_tokenizer(model_spec.path)
    ids = tokenize(tokenizer, text)
    bos = sequence_bos(tokenizer, model_spec.add_bos)
    chunks = eval_chunks(ids, spec.ctx, spec.max_chunks, bos)
    # the quantized model first: streamed, it keeps only the quantized bytes of its blocks, so the
    # host never holds two float models at once
    quant_model = load_quantized_model(model_spec.path, quant_dir, model_spec.device, model_spec.stream)
    reference = reference or model_spec
    float_model = load_model(reference.path, reference.device, reference.stream)
    torch_scores = score(quant_model, chunks, ref_model=float_model, batch_size=spec.batch_size)
    del float_model
    manifest, _ = read_quantized(quant_dir)
    gguf_path = gguf_dir / "model.gguf"

    runtimes: dict[str, dict] = {}
    if "llama_cpp" in spec.runtimes:
        lc = llama_cpp_perplexity(gguf_path, text, spec.ctx, spec.max_chunks)
        same_tokens = same_tokens_as_torch(lc.pop("tokens"), lc.pop("bos_id"), bos, ids, chunks.numel())
        lc.pop("seconds")  # wall times stay out of artifacts
        runtimes["llama_cpp"] = {**lc, "ppl_gap_vs_torch": abs(lc["ppl"] / torch_scores["ppl"] - 1),
                                 "same_tokens_as_torch": same_tokens}
    if "onnxruntime" in spec.runtimes:
        runtimes["onnxruntime"] = onnx_check(onnx_dir / "model.onnx", chunks[: spec.onnx_chunks], quant_model)
        runtimes["onnxruntime"].pop("seconds")

    report = {
        "eval_text_sha256": sha256_file(spec.text), "ctx": spec.ctx, "n_chunks": int(chunks.shape[0]),
        "n_tokens_scored": torch_scores["n_tokens"], "ppl_float": torch_scores["ref_ppl"],
        "ppl_quant": torch_scores["ppl"], "ppl_ratio": torch_scores["ppl"] / torch_scores["ref_ppl"],
        "kl_mean": torch_scores["kl_mean"], "gguf_bytes": gguf_path.stat().st_size,
        "bits_per_weight": manifest.bits_per_weight, "runtimes": runtimes,
    }
    checks = _gate(spec, report)
    result = ValidationReport(**report, gate=checks, passed=all(c["passed"] for c in checks.values()))
    write_json(out_dir / REPORT_FILE, result.model_dump())
    write_json(out_dir / METRICS_FILE, scoped_metrics(report, result.passed))
    float_bytes = 4 * sum(q.shape[0] * q.shape[1] for q in manifest.quantized) + (manifest.total_bytes - sum(
        q.bytes for q in manifest.quantized))
    rows = [{"model": "float32", "bytes": float_bytes, "ppl": report["ppl_float"]},
            {"model": "quantized (torch)", "bytes": manifest.total_bytes, "ppl": report["ppl_quant"]}]
    if "llama_cpp" in runtimes:
        rows.append({"model": "quantized (llama.cpp)", "bytes": report["gguf_bytes"], "ppl": runtimes["llama_cpp"]["ppl"]})
    write_json(out_dir / PLOT_FILE, rows)
    if not result.passed:
        failed = [f"{k}: {c['value']:.4g} > {c['limit']}" if isinstance(c["value"], float) else f"{k}: failed ({c['limit']})"
                  for k, c in checks.items() if not c["passed"]]
        raise HaloquantError(f"validate.gate failed ({'; '.join(failed)}); report in {out_dir / REPORT_FILE}")
    return result
