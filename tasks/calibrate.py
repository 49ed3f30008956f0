"""calibrate: run calibration text through the float model and keep, for every linear layer's
input, per-channel mean |x|, max |x| and E[x²] (llama.cpp's imatrix), the windows themselves and
token counts (for embeddings); the Gram matrix E[xxᵀ] only for inputs outside the decoder blocks
(the output head's).

The decoder blocks' Gram matrices — the sensitivity stage's output error tr(ΔW E[xxᵀ] ΔWᵀ),
Scale-Fold's search and GPTQ's Hessian — are d×d per input: 33 GB for Llama-3-8B. The stages that
need them rebuild one block's at a time from the kept windows (haloquant/layergrams.py), so this
artifact stays O(width) per input, whatever the model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from haloquant import HaloquantError
from haloquant.artifacts import atomic_path, sha256_file, write_json
from haloquant.blocks import block_inputs, block_output, logits_after_blocks
from haloquant.inputs import check_enough_tokens, check_finite
from haloquant.modelio import (decoder_layers, load_model, load_tokenizer, model_name, output_head_module,
                               quantizable_tensors)
from haloquant.progress import track
from haloquant.streaming import compute_device, on_device
from haloquant.textdata import calibration_batch, read_text, sequence_bos, tokenize
from haloquant.schemas.artifacts import CalibrationReport
from haloquant.schemas.params import CalibrationSpec, ModelSpec

STATS_FILE = "stats.safetensors"
REPORT_FILE = "calibration.json"
MICRO_BATCH = 8


class _InputStats:
    """Accumulates per-channel statistics of one linear input, deduplicated across modules."""

    def __init__(self, dim: int, device: torch.device, with_gram: bool):
        self.sum_abs = torch.zeros(dim, dtype=torch.float64, device=device)
        self.max_abs = torch.zeros(dim, dtype=torch.float32, device=device)
        self.sum_sq = torch.zeros(dim, dtype=torch.float64, device=device)
        self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=device) if with_gram else None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        xa = x.abs()
        self.sum_abs += xa.sum(0, dtype=torch.float64)
        self.max_abs = torch.maximum(self.max_abs, xa.amax(0).float())
        xd = x.double()
        self.sum_sq += xd.pow(2).sum(0)
        if self.gram is not None:
            self.gram += xd.T @ xd
        self.count += x.shape[0]


@torch.no_grad()
def calibrate(model_spec: ModelSpec, spec: CalibrationSpec, out_dir: Path) -> CalibrationReport:
    text = read_text(spec.text, "calibration.text")
    model = load_model(model_spec.path, model_spec.device, model_spec.stream)
    check_finite(model)
    tokenizer = load_tokenizer(model_spec.path)
    device = compute_device(model)
    ids = tokenize(tokenizer, text)
    bos = sequence_bos(tokenizer, model_spec.add_bos)
    check_enough_tokens(len(ids) + (bos is not None), spec.n_sequences * spec.seq_len, "calibration.text",
                        f"tokens of calibration.n_sequences × seq_len = {spec.n_sequences} × {spec.seq_len}")
    batch = calibration_batch(ids, spec.n_sequences, spec.seq_len, spec.seed, bos)

    # every linear whose weight is quantized (the tied output head shares the embedding's weight)
    weight_ids = {id(p) for n, p in model.named_parameters(remove_duplicate=False)
                  if n in {t.name for t in quantizable_tensors(model)}}
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and id(m.weight) in weight_ids}

    block_prefixes = tuple(f"{n}." for n, m in model.named_modules() if any(m is b for b in decoder_layers(model)))

    def in_blocks(name: str) -> bool:
        return name.startswith(block_prefixes)

    stats: dict[str, _InputStats] = {}
    input_of: dict[str, str] = {}
    # Modules that read the very same tensor (q/k/v, gate/up) share one set of statistics. The
    # tensor object is the identity, kept alive until the forward pass ends so that neither its
    # memory nor its id can pass to a later tensor: a data pointer alone can, and once merged the
    # inputs of unrelated modules that happened to reuse freed memory.
    seen_this_batch: dict[int, tuple[torch.Tensor, str]] = {}

    def hook(name):
        def fn(_module, args):
            x = args[0]
            seen = seen_this_batch.get(id(x))
            if seen is None:  # first module to see this tensor owns its statistics
                key = input_of.setdefault(name, name)
                seen_this_batch[id(x)] = (x, key)
                stats.setdefault(key, _InputStats(x.shape[-1], device, not in_blocks(name))).add(x)
            else:
                key = seen[1]
            input_of.setdefault(name, key)
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    token_counts = torch.zeros(model.config.vocab_size, dtype=torch.float64)
    try:  # block-major: every micro-batch through a block before the next (a streamed block moves once)
        hidden, kwargs = block_inputs(model, batch, MICRO_BATCH)
        for layer, kw in track(list(zip(decoder_layers(model), kwargs)), "calibrate", "blocks"):
            with on_device(layer, device):
                out = []
                for h, k in zip(hidden, kw):
                    seen_this_batch.clear()
                    out.append(layer(block_output(h), **k))
            hidden = out
        for i, last in zip(range(0, batch.shape[0], MICRO_BATCH), hidden):  # final norm and head
            mb = batch[i : i + MICRO_BATCH]
            seen_this_batch.clear()
            logits_after_blocks(model, mb.to(device), last)
            token_counts += torch.bincount(mb.flatten(), minlength=token_counts.numel()).double()
    finally:
        for h in handles:
            h.remove()

    # the windows themselves: sensitivity's KL probe reruns the first of them
    tensors: dict[str, torch.Tensor] = {"token_counts": token_counts, "calibration_ids": batch}
    for key, s in stats.items():
        if not (torch.isfinite(s.sum_sq).all() and torch.isfinite(s.max_abs).all()):
            raise HaloquantError(f"calibration.text: the input of {key} takes non-finite values (NaN or Inf) on "
                                 "the calibration text: the model overflows in float32 there")
        tensors[f"{key}.mean_abs"] = (s.sum_abs / s.count).float().cpu()
        tensors[f"{key}.max_abs"] = s.max_abs.cpu()
        tensors[f"{key}.sq_mean"] = (s.sum_sq / s.count).float().cpu()  # E[x²] per channel
        if s.gram is not None:
            tensors[f"{key}.gram"] = (s.gram / s.count).float().cpu()  # E[x xᵀ] per token
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / STATS_FILE) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    report = CalibrationReport(
        model=model_name(model_spec.path), text_sha256=sha256_file(spec.text),
        n_sequences=spec.n_sequences, seq_len=spec.seq_len, seed=spec.seed, n_tokens=int(batch.numel()),
        stats_file=STATS_FILE, input_of=input_of, output_head=output_head_module(model), bos_id=bos,
        device=str(device),
    )
    write_json(out_dir / REPORT_FILE, report.model_dump())
    return report
