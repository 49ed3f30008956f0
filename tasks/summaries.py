"""One line a person reads at the end of each stage: what it wrote (the artifacts hold the rest)."""

from __future__ import annotations

from collections import Counter

from haloquant.schemas.artifacts import (AllocationResult, CalibrationReport, ExportReport, FoldResult,
                                         PolicyCard, QuantizedManifest, RotationRecord, SensitivityTable,
                                         SweepPoint, ValidationReport, WideningPlan)


def _counts(values) -> str:
    return ", ".join(f"{n}×{k}" for k, n in Counter(values).most_common())


def summary(obj) -> str:
    if isinstance(obj, WideningPlan):
        return (f"widen {obj.hidden[0]} → {obj.hidden[1]}" if obj.widen else "as it is") + f" ({obj.reason})"
    if isinstance(obj, RotationRecord):
        widened = f"widened {obj.widened[0]} → {obj.widened[1]}" if obj.widened else ""
        if not obj.enabled:
            return f"{obj.model} {widened}: {len(obj.files)} files" if widened else \
                f"{obj.model} as it is (rotate.enabled: false)"
        return (f"{obj.model} {widened + ', ' if widened else ''}rotated (seed {obj.seed}"
                f"{', v → o per head' if obj.heads else ''}{', head untied' if obj.untied_head else ''}): "
                f"{len(obj.files)} files")
    if isinstance(obj, CalibrationReport):
        return (f"{obj.n_tokens:,} tokens ({obj.n_sequences} × {obj.seq_len}) through {obj.model}; statistics of "
                f"{len(set(obj.input_of.values()))} linear inputs")
    if isinstance(obj, SensitivityTable):
        n = sum(len(t.candidates) for t in obj.tensors)
        return f"{len(obj.tensors)} tensors, {n} tensor × format costs ({obj.metric})"
    if isinstance(obj, AllocationResult):
        onnx = "" if obj.onnx_bytes is None else f"; ONNX {obj.onnx_bytes:,} bytes" + (
            f" of {obj.onnx_budget_bytes:,}" if obj.onnx_budget_bytes is not None else "")
        return (f"{obj.bits_per_weight:.3f} bits per weight, {obj.used_bytes:,} of {obj.budget_bytes:,} bytes "
                f"({obj.solver}){onnx}: {_counts(c.format for c in obj.tensors)}")
    if isinstance(obj, FoldResult):
        folded = sum(1 for g in obj.groups if g.get("alpha", 0) > 0)
        return f"{obj.method}: {folded} of {len(obj.groups)} groups folded"
    if isinstance(obj, QuantizedManifest):
        return (f"{len(obj.quantized)} tensors ({obj.method}), {obj.bits_per_weight:.3f} bits per weight, "
                f"{obj.total_bytes:,} bytes of tensor data")
    if isinstance(obj, ExportReport):
        return f"{obj.file}, {obj.bytes:,} bytes: " + ", ".join(f"{n}×{k}" for k, n in obj.tensor_types.items())
    if isinstance(obj, ValidationReport):
        lc = obj.runtimes.get("llama_cpp", {})
        return (f"perplexity {obj.ppl_float:.3f} → {obj.ppl_quant:.3f} (×{obj.ppl_ratio:.4f}), KL {obj.kl_mean:.4f} "
                f"over {obj.n_tokens_scored:,} tokens" + (f"; llama.cpp {lc['ppl']:.3f}" if lc else "") +
                f"; gate {'passed' if obj.passed else 'FAILED'}")
    if isinstance(obj, SweepPoint):
        return f"{obj.series} {obj.label}: {obj.gguf_bytes:,} bytes, llama.cpp perplexity {obj.ppl:.3f}"
    if isinstance(obj, PolicyCard):
        return f"SAC policy, {obj.timesteps} steps, {obj.episodes} episodes, proxy regret {obj.final_proxy_regret:.3f}"
    if isinstance(obj, list):
        return f"{len(obj)} points"
    if isinstance(obj, dict):
        return ", ".join(f"{k}: {v}" for k, v in obj.items())
    return str(obj)
