"""onnxruntime as the judge of the ONNX export: logits on the evaluation chunks."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from haloquant.textdata import scored_slice


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_logits(session, batch: np.ndarray) -> np.ndarray:
    """Full-sequence logits of a text-generation-with-past export, with an empty cache."""
    b, n = batch.shape
    feeds = {}
    for inp in session.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = batch.astype(np.int64)
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((b, n), dtype=np.int64)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.tile(np.arange(n, dtype=np.int64), (b, 1))
        elif inp.name.startswith("past_key_values"):
            _, heads, _, dim = inp.shape
            feeds[inp.name] = np.zeros((b, heads, 0, dim), dtype=np.float32)
    return session.run(["logits"], feeds)[0]


def _nll(logits: torch.Tensor, target: torch.Tensor) -> float:
    return -F.log_softmax(logits.double(), -1).gather(-1, target.unsqueeze(-1)).sum().item()


@torch.no_grad()
def onnx_check(path: Path, chunks: torch.Tensor, torch_model, batch_size: int = 2) -> dict:
    """Perplexity of the ONNX model on `chunks`, torch's on the same chunks, and the largest logit
    deviation between the two."""
    t0 = time.perf_counter()
    session = _session(path)
    sl = scored_slice(chunks.shape[1])
    nll, torch_nll, n_tok, max_abs, max_rel = 0.0, 0.0, 0, 0.0, 0.0
    for i in range(0, chunks.shape[0], batch_size):
        batch = chunks[i : i + batch_size]
        ort_logits = torch.from_numpy(onnx_logits(session, batch.numpy()))
        ref = torch_model(batch.to(next(torch_model.parameters()).device)).logits.float().cpu()
        err = (ort_logits - ref).abs().max().item()
        max_abs = max(max_abs, err)
        max_rel = max(max_rel, err / ref.abs().max().item())
        target = batch[:, sl.start + 1 : sl.stop + 1]
        nll += _nll(ort_logits[:, sl], target)
        torch_nll += _nll(ref[:, sl], target)
        n_tok += target.numel()
    return {"ppl": math.exp(nll / n_tok), "torch_ppl_same_chunks": math.exp(torch_nll / n_tok),
            "n_tokens": n_tok, "n_chunks": int(chunks.shape[0]), "max_abs_logit_error": max_abs,
            "max_rel_logit_error": max_rel, "seconds": time.perf_counter() - t0}


def genai_greedy(folder: Path, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation by onnxruntime-genai's generator from the export folder (its
    genai_config.json, KV cache and all), the way an edge app runs the model: the new tokens only."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    n = len(prompt_ids) + new_tokens
    params.set_search_options(max_length=n, min_length=n, do_sample=False)  # exactly new_tokens: EOS held off
    generator = og.Generator(model, params)
    generator.append_tokens(prompt_ids)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(prompt_ids):]]


def torch_greedy(model, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """The same greedy continuation by transformers' generate (EOS held off the same way)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False,
                             attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    return out[0, len(prompt_ids):].tolist()
