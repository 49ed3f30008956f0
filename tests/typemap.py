"""Test helpers: quantize a model folder through the real stages at a fixed type map (no sensitivity or
allocation), and score the result in torch and in llama.cpp on the same text. Shared by the tests of
the function-preserving rewrites (rotation, widening) and of the quantizer's tuning steps."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from haloquant.artifacts import write_json
from haloquant.evaluation import score
from haloquant.llamacpp import llama_cpp_perplexity
from haloquant.modelio import TensorInfo, load_model, load_tokenizer, quantizable_tensors
from haloquant.presets import allocation_from_type_map
from haloquant.quantized import load_quantized_model
from haloquant.schemas.params import CalibrationSpec, FoldSpec, GGUFSpec, ModelSpec, QuantizeSpec
from haloquant.tasks.calibrate import calibrate
from haloquant.tasks.export_gguf import export_gguf
from haloquant.tasks.quantize import quantize
from haloquant.tasks.scale_fold import scale_fold
from haloquant.textdata import eval_chunks, read_text, sequence_bos, tokenize
from tests.conftest import CALIB_TEXT, EVAL_TEXT


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits.float()


def q3k_with_iq3s_down(i: int, t: TensorInfo) -> str:
    """Q3_K, the embedding Q6_K, ffn_down IQ3_S: a lattice type (codes on a grid of points, not a scale
    times integers) beside the k-quants, for the tuning steps' tests."""
    return "Q6_K" if t.kind == "token_embd" else "IQ3_S" if "ffn_down" in t.gguf_name else "Q3_K"


def quantize_at_type_map(spec: ModelSpec, out: Path, pick: Callable[[int, TensorInfo], str],
                         quantizers: dict[str, QuantizeSpec], n_sequences: int = 4,
                         seq_len: int = 64) -> tuple[list[TensorInfo], dict[str, str]]:
    """calibrate → a type map (`pick(index, tensor)` → format) → scale_fold (identity) → quantize once per
    entry of `quantizers`, into out/<name>. Returns the tensors and the type map."""
    calibrate(spec, CalibrationSpec(text=CALIB_TEXT, n_sequences=n_sequences, seq_len=seq_len), out / "calibrate")
    infos = quantizable_tensors(load_model(spec.path, "cpu"))
    type_map = {t.gguf_name: pick(i, t) for i, t in enumerate(infos)}
    write_json(out / "allocate" / "allocation.json", allocation_from_type_map(infos, type_map, "test").model_dump())
    scale_fold(spec, FoldSpec(), out / "calibrate", out / "allocate", out / "scale_fold")
    for name, q in quantizers.items():
        quantize(spec, q, out / "calibrate", out / "allocate", out / "scale_fold", out / name)
    return infos, type_map


def gguf_and_torch_perplexity(spec: ModelSpec, quantized: Path, gguf_dir: Path, ctx: int = 128,
                              chunks: int = 3) -> tuple[float, float]:
    """Export the quantize stage's output to gguf_dir/model.gguf; (llama.cpp's, torch's) perplexity of
    the same decoded weights on the first `chunks` windows of the evaluation text."""
    export_gguf(spec, GGUFSpec(), quantized, gguf_dir)
    tok = load_tokenizer(spec.path)
    text = read_text(EVAL_TEXT, "eval")
    windows = eval_chunks(tokenize(tok, text), ctx, chunks, sequence_bos(tok, spec.add_bos))
    torch_ppl = score(load_quantized_model(spec.path, quantized, "cpu"), windows)["ppl"]
    return llama_cpp_perplexity(gguf_dir / "model.gguf", text, ctx, chunks)["ppl"], torch_ppl
