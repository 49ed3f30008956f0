"""sensitivity: for every quantizable weight and candidate format, the cost of storing that weight
in that format, with the quantizer that will really run (quantize section: RTN, GPTQ, …).

Metrics (cost of each, for T tensors and F formats):
- `output_error`: E‖(W − Q(W))x‖² = tr(ΔW E[xxᵀ] ΔWᵀ) from calibration statistics — T·F encodes,
  no forward pass. In each layer's own output units: a small error in v_proj can cost more
  downstream than a large one in gate_proj.
- `hessian_trace` (HAWQ-v2 / BAQ style): Σ_j E[x_j²] Σ_i ΔW_ij², the diagonal of the above.
- `kl_calibrated` (default): the output-error curve of each tensor put in common units by one
  measurement — KL(float ‖ model with only that tensor quantized, at the candidate nearest 4 bits)
  on `kl_sequences` calibration sequences: cost = KL_ref · err(f) / err(ref). T probes (each from the
  weight's own block on: KLProbe).
- `kl_end_to_end`: that KL measured for every tensor and format — T·F forward passes.
- `kl_fisher`: the second-order KL of an output-channel-diagonal Fisher (haloquant/fisher.py):
  ½ Σ_i f_i (ΔW G ΔWᵀ)_ii, f from one forward and backward pass over `kl_sequences` sequences —
  KL units for every tensor at once, at a cost that does not grow with depth × tensors.
- `auto` (default): kl_calibrated where its T probes cost at most `probe_budget_tflop` (probe_tflop),
  else kl_fisher. The probes grow as tensors × depth × (width + vocabulary): minutes on a small
  model, ~30 min of probes on 2 CPU cores for Qwen2.5-0.5B (229 TFLOP), hours from ~1 B on, while
  kl_fisher costs one forward and backward pass. Measured on ref-llama-a (docs/stages.md): the
  two give the same perplexity at 3.5 bpw and kl_fisher's is 0.1 % higher at 4.5 bpw. The table
  records the metric that ran.
For a tied embedding the error of its lookup (token-frequency weighted, times the family's embedding
scale², e.g. Gemma's √hidden) is added to the head's. Candidates: the listed formats that fit a
tensor's rows, plus `fallback_formats` where a listed one does not (candidate_formats).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from haloquant.arrays import row_chunks
from haloquant.artifacts import write_json
from haloquant.budget import candidate_formats
from haloquant.calibstats import CalibrationStats
from haloquant.embedding import FEATURES, relative_sizes, tensor_features
from haloquant import HaloquantError
from haloquant.families import family
from haloquant.fisher import fisher_lookup_error, fisher_output_error, output_fisher
from haloquant.klprobe import KLProbe, first_block  # noqa: F401  (KLProbe: also the tests')
from haloquant.gguf_writer import gguf_add_bos, gguf_overhead_bytes
from haloquant.modelio import (TensorInfo, decoder_layers, float_tensors, load_model, model_name, output_head_module,
                               quantizable_tensors)
from haloquant.progress import track
from haloquant.resume import Journal
from haloquant.streaming import compute_device
from haloquant.widening import source_weight_ratio
from haloquant.quantizer import encode_tensor
from haloquant.schemas.artifacts import (FormatCost, LayerEmbeddings, SensitivityTable, TensorEmbedding,
                               TensorSensitivity)
from haloquant.schemas.params import ModelSpec, QuantizeSpec, SensitivitySpec

log = logging.getLogger(__name__)

TABLE_FILE = "sensitivity.json"
EMBEDDINGS_FILE = "embeddings.json"
REFERENCE_BITS = 4.0  # kl_calibrated measures each tensor at the candidate nearest this


def output_error(delta: torch.Tensor, gram: torch.Tensor) -> float:
    """Σ_rows δᵀ G δ: expected squared output error per token (G = E[x xᵀ])."""
    return float(((delta @ gram) * delta).sum())


def diagonal_error(delta: torch.Tensor, gram: torch.Tensor) -> float:
    """Σ_j G_jj Σ_i δ_ij²: the Hessian-diagonal (trace) approximation of output_error."""
    return float((delta.pow(2).sum(0) * torch.diagonal(gram)).sum())


def lookup_error(delta: torch.Tensor, token_freq: torch.Tensor) -> float:
    """Embedding lookup: expected squared error of the looked-up row, weighted by token frequency."""
    return float((delta.pow(2).sum(1) * token_freq).sum())


def probe_tflop(model, infos: list[TensorInfo], n_sequences: int, seq_len: int) -> float:
    """What kl_calibrated's probes cost, in 10¹² floating-point operations: each tensor's probe runs
    the decoder blocks from its own on and the head over n_sequences × seq_len tokens, 2 operations
    per weight and token, plus attention's 4 · seq_len · width per token and block."""
    layers = decoder_layers(model)
    cfg = model.config
    attn_width = getattr(cfg, "num_attention_heads", 0) * (getattr(cfg, "head_dim", None)
                                                           or cfg.hidden_size // max(1, cfg.num_attention_heads))
    per_token = [2 * sum(p.numel() for p in block.parameters()) + 4 * seq_len * attn_width for block in layers]
    head = model.get_output_embeddings()
    head_ops = 2 * head.weight.numel() if head is not None else 0
    after = [sum(per_token[i:]) + head_ops for i in range(len(layers) + 1)]
    return sum(after[first_block(t, len(layers))] for t in infos) * n_sequences * seq_len / 1e12


def resolve_metric(spec: SensitivitySpec, model, infos: list[TensorInfo], ids: torch.Tensor) -> str:
    """`auto` → kl_calibrated if its probes fit spec.probe_budget_tflop, else kl_fisher; any other
    metric as given."""
    if spec.metric != "auto":
        return spec.metric
    cost = probe_tflop(model, infos, *ids.shape)
    chosen = "kl_calibrated" if cost <= spec.probe_budget_tflop else "kl_fisher"
    log.info("sensitivity.metric auto: kl_calibrated's probes would cost %.1f TFLOP (probe_budget_tflop %g): %s",
             cost, spec.probe_budget_tflop, chosen)
    return chosen


def linear_of(model, t: TensorInfo) -> str | None:
    """The linear whose output this weight makes: its own, or for a tied embedding the output head;
    None for an untied embedding, which is only looked up (its cost is the lookup's)."""
    if t.kind == "token_embd":
        return output_head_module(model) if t.tied else None
    return t.module


def _gguf_overhead(model_spec: ModelSpec, infos, floats) -> int:
    """What a GGUF of this model holds beyond tensor data (for allocation.budget.file_bytes)."""
    return gguf_overhead_bytes(Path(model_spec.path), {t.name: t.shape for t in infos},
                               {n: v.cpu().numpy() for n, v in floats.items()}, model_name(model_spec.path),
                               gguf_add_bos(model_spec))


@torch.no_grad()
def uses_llama_cpp_candidate(spec: SensitivitySpec, device: torch.device) -> bool:
    """`llama_cpp_candidate: auto`: on a CPU the candidate is ≈ 7 % of the stage and prices the real bytes; on a GPU
    llama.cpp's blocks (made on the host's cores) are half of it, for allocations level with haloquant's fit alone
    (bench/results/sensitivity_candidate_ref-llama-a.md, scale_h100_streamed.md)."""
    if spec.llama_cpp_candidate == "auto":
        return torch.device(device).type == "cpu"
    return spec.llama_cpp_candidate


def score_sensitivity(model_spec: ModelSpec, spec: SensitivitySpec, quant_spec: QuantizeSpec, calib_dir: Path,
                      out_dir: Path) -> SensitivityTable:
    """`quant_spec` is the quantizer the costs are measured for (the one quantize will run)."""
    model = load_model(model_spec.path, model_spec.device, model_spec.stream)
    device = compute_device(model)
    stats = CalibrationStats(calib_dir, model=model)
    params = dict(model.named_parameters(remove_duplicate=False))
    token_freq = stats.token_freq().to(device)
    ids = stats.tensor("calibration_ids")[: spec.kl_sequences]
    infos = quantizable_tensors(model)
    metric = resolve_metric(spec, model, infos, ids)
    with_candidate = uses_llama_cpp_candidate(spec, device)
    probe = KLProbe(model, ids) if metric in ("kl_calibrated", "kl_end_to_end") else None
    local = diagonal_error if metric == "hessian_trace" else output_error
    if metric == "kl_fisher":
        fisher = output_fisher(model, ids, sorted({linear_of(model, t) for t in infos} - {None}))

    # a looked-up row's error in residual-stream units (Gemma multiplies the embedding by √hidden)
    lookup_scale = family(model).embedding_scale(model.config) ** 2
    rows: list[TensorSensitivity] = []
    features: list[list[float]] = []  # the SAC policy's per-tensor features, while the block's Hessians are held
    mean_weights = sum(t.n_weights for t in infos) / len(infos)
    journal = Journal()  # an interrupted run's finished tensors (haloquant/resume.py)
    if journal.done:
        log.info("sensitivity: resuming — %d of %d tensors were finished by an interrupted run", len(journal.done),
                 len(infos))
    for t in track(infos, "sensitivity", "tensors"):
        started = time.perf_counter()
        if t.name in journal.done:
            row, feats = journal.done[t.name]
            rows.append(TensorSensitivity.model_validate(row))
            features.append(feats)
            continue
        w = params[t.name].detach().to(device, torch.float32)
        w_host = w.cpu()  # once per tensor: the encoders take it from the host
        gram = stats.gram(t).to(device)
        features.append(tensor_features(t, w, stats, model.config.num_hidden_layers, model.config.hidden_size,
                                        mean_weights, gram))
        fmts = candidate_formats(spec, t.shape)
        if not fmts:
            raise HaloquantError(f"sensitivity.formats: no listed or fallback format fits tensor {t.name} of shape "
                                 f"{t.shape}")
        # kl_calibrated probes one format per tensor and scales the others' errors by the ratio
        ref = min(fmts, key=lambda f: abs(f.bits_per_weight - REFERENCE_BITS)).name
        m = linear_of(model, t)

        def row_error(delta: torch.Tensor, part: slice) -> float:
            """The local error of `delta`, the weights' error on rows `part` (every metric's is a sum over rows)."""
            if metric == "kl_fisher":
                err = 0.0 if m is None else fisher.coherence[m] * fisher_output_error(delta, gram,
                                                                                       fisher.channels[m][part])
                if t.kind == "token_embd":
                    err += lookup_scale * fisher_lookup_error(delta, token_freq[part], fisher.block0)
                return err
            err = local(delta, gram)  # as a linear (for embeddings: the output head)
            if t.kind == "token_embd":
                lookup = lookup_scale * lookup_error(delta, token_freq[part])
                err = err + lookup if t.tied else lookup
            return err

        cands: dict[str, FormatCost] = {}
        probed = 0.0
        for fmt in fmts:
            if metric == "none":
                cands[fmt.name] = FormatCost(bytes=fmt.storage_bytes(t.shape), error=0.0)
                continue
            measured = fmt if with_candidate else fmt.own_fit_only()
            data = encode_tensor(t, w_host.numpy(), measured, quant_spec, stats, device)
            if metric == "kl_end_to_end":
                err = probe.kl(t.name, fmt.decode_torch(data, t.shape, device), probe.first_block(t))
            else:
                err = 0.0
                for part in row_chunks(*t.shape):  # one chunk of a large tensor's float copies at a time
                    err += row_error(w[part] - fmt.decode_torch(data[part], (part.stop - part.start, t.shape[1]),
                                                                device), part)
                if metric == "kl_calibrated" and fmt.name == ref:
                    probed = probe.kl(t.name, fmt.decode_torch(data, t.shape, device), probe.first_block(t))
            cands[fmt.name] = FormatCost(bytes=fmt.storage_bytes(t.shape), error=err)
        if metric == "kl_calibrated":
            scale = probed / cands[ref].error if cands[ref].error > 0 else 0.0
            cands = {f: FormatCost(bytes=c.bytes, error=c.error * scale) for f, c in cands.items()}
        rows.append(TensorSensitivity(name=t.name, gguf_name=t.gguf_name, kind=t.kind, layer=t.layer,
                                      shape=t.shape, n_weights=t.n_weights, candidates=cands))
        journal.record(t.name, [rows[-1].model_dump(mode="json"), features[-1]])
        log.debug("sensitivity: %s (block %d) %.2f s", t.name, t.layer, time.perf_counter() - started)
    emb = relative_sizes(features)
    write_json(out_dir / EMBEDDINGS_FILE, LayerEmbeddings(features=list(FEATURES), tensors=[
        TensorEmbedding(gguf_name=t.gguf_name, values=v) for t, v in zip(infos, emb)]).model_dump())
    floats = float_tensors(model)
    fixed = sum(p.numel() * 4 for p in floats.values())
    table = SensitivityTable(metric=metric, formats=spec.formats, fixed_bytes=fixed, tensors=rows,
                             gguf_overhead_bytes=_gguf_overhead(model_spec, infos, floats),
                             source_weight_ratio=source_weight_ratio(model_spec.path))
    write_json(out_dir / TABLE_FILE, table.model_dump())
    return table
