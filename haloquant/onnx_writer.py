"""ONNX export: optimum exports the model holding the decoded quantized weights; then every linear
whose format onnxruntime can hold as integers becomes a `com.microsoft.MatMulNBits` node carrying
the *same* integer codes, scales and zero points as the GGUF — nothing is re-quantized.

onnxruntime's CPU kernel takes 2-, 4- and 8-bit codes in groups of 16–256; it refuses 8-bit codes
with float zero points, so formats needing that (Q5_1) stay float MatMuls of the decoded weight.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from haloquant import HaloquantError
from haloquant.formats import AffineBlocks, get_format
from haloquant.schemas.artifacts import QuantizedManifest

MS_DOMAIN = "com.microsoft"


def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """(N, groups, G) codes → (N, groups, G·bits/8) bytes, lowest bits first (MatMulNBits layout)."""
    per = 8 // bits
    n, g, size = q.shape
    q = q.reshape(n, g, size // per, per).astype(np.uint8)
    out = np.zeros((n, g, size // per), dtype=np.uint8)
    for i in range(per):
        out |= q[..., i] << np.uint8(bits * i)
    return out


def pack_zero_points(zero: np.ndarray, bits: int) -> np.ndarray:
    """(N, groups) integer zero points → MatMulNBits' packed uint8 layout (N · ceil(groups·bits/8))."""
    per = 8 // bits
    n, g = zero.shape
    pad = (-g) % per
    z = np.concatenate([zero.astype(np.uint8), np.zeros((n, pad), np.uint8)], axis=1).reshape(n, -1, per)
    out = np.zeros(z.shape[:2], dtype=np.uint8)
    for i in range(per):
        out |= z[..., i] << np.uint8(bits * i)
    return out.reshape(-1)


def ort_supports(blocks: AffineBlocks) -> bool:
    """MatMulNBits decodes linear codes only: IQ4's table-indexed codes stay float MatMul."""
    group = blocks.q.shape[-1]
    return (blocks.values is None and blocks.bits in (2, 4, 8) and 16 <= group <= 256 and group & (group - 1) == 0
            and not (blocks.bits == 8 and not blocks.zero_is_integer))


def matmul_nbits(node: onnx.NodeProto, blocks: AffineBlocks, prefix: str) -> tuple[onnx.NodeProto, list]:
    n, groups, group = blocks.q.shape
    inits = [numpy_helper.from_array(pack_codes(blocks.q, blocks.bits), f"{prefix}.qweight"),
             numpy_helper.from_array(blocks.scale.reshape(-1).astype(np.float32), f"{prefix}.scales")]
    if blocks.zero_is_integer:
        inits.append(numpy_helper.from_array(pack_zero_points(np.rint(blocks.zero), blocks.bits), f"{prefix}.zeros"))
    else:
        inits.append(numpy_helper.from_array(blocks.zero.reshape(-1).astype(np.float32), f"{prefix}.zeros"))
    new = helper.make_node("MatMulNBits", [node.input[0]] + [i.name for i in inits], list(node.output),
                           name=f"{node.name}_Q{blocks.bits}", domain=MS_DOMAIN,
                           K=groups * group, N=n, bits=blocks.bits, block_size=group)
    return new, inits


def _module_of(node_name: str) -> str:
    """optimum's node names carry the module path: /model/layers.0/mlp/up_proj/MatMul."""
    return node_name.strip("/").rsplit("/", 1)[0].replace("/", ".")


def rewrite_linears(model: onnx.ModelProto, manifest: QuantizedManifest, tensors: dict[str, np.ndarray],
                    weight_of_module: dict[str, str]) -> dict[str, str]:
    """Replace MatMuls of quantized weights by MatMulNBits in place; returns module → how stored."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    qinfo = {q.name: q for q in manifest.quantized}
    stored: dict[str, str] = {}
    new_nodes = []
    for node in graph.node:
        module = _module_of(node.name)
        wname = weight_of_module.get(module)
        if node.op_type != "MatMul" or wname not in qinfo or node.input[1] not in inits:
            new_nodes.append(node)
            continue
        q = qinfo[wname]
        fmt = get_format(q.format)
        expected = fmt.decode(tensors[wname], q.shape)
        actual = numpy_helper.to_array(inits[node.input[1]])
        if actual.shape != expected.T.shape or not np.array_equal(actual, expected.T):
            raise HaloquantError(f"export_onnx: exported weight of {module} differs from the quantized artifact")
        blocks = fmt.affine_blocks(tensors[wname], q.shape)
        if blocks is None or not ort_supports(blocks):
            stored[module] = f"{q.format}: MatMul float32 (no onnxruntime integer kernel for it)"
            new_nodes.append(node)
            continue
        nb_node, nb_inits = matmul_nbits(node, blocks, module)
        graph.initializer.extend(nb_inits)
        new_nodes.append(nb_node)
        stored[module] = f"{q.format}: MatMulNBits bits={blocks.bits} block={blocks.q.shape[-1]}"
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return stored


@contextmanager
def _quiet(*loggers: str):
    """Those libraries' loggers at ERROR for the block (optimum logs an INFO/WARNING per step)."""
    saved = {n: logging.getLogger(n).level for n in loggers}
    for n in loggers:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


def export_onnx_model(model, tokenizer_dir: Path, manifest: QuantizedManifest, tensors: dict[str, np.ndarray],
                      out_dir: Path, opset: int) -> dict[str, str]:
    """optimum export of `model` (already holding decoded weights) + integer rewrite, into out_dir
    (an existing, empty folder: the caller swaps it in whole)."""
    from optimum.exporters.onnx import main_export

    weight_of_module = {n.removesuffix(".weight"): n for n, _ in model.named_parameters(remove_duplicate=False)}
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is embedding.weight:  # a tied head holds the embedding's codes
        names = {id(m): n for n, m in model.named_modules()}
        weight_of_module[names[id(head)]] = f"{names[id(embedding)]}.weight"
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, onnx_dir = Path(tmp) / "hf", Path(tmp) / "onnx"
        model.save_pretrained(hf_dir)
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (tokenizer_dir / f).is_file():
                shutil.copy(tokenizer_dir / f, hf_dir / f)
        with warnings.catch_warnings(), _quiet("optimum", "transformers"):
            # the tracer's notes on data-dependent branches (attention masks, cache checks): optimum
            # exports these models so; the export is checked by validate (ONNX logits vs torch)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*(torch_dtype|advanced indexing).*")
            main_export(str(hf_dir), output=str(onnx_dir), task="text-generation-with-past", opset=opset,
                        device="cpu", do_validation=False)
        onnx_model = onnx.load(str(onnx_dir / "model.onnx"))
        stored = rewrite_linears(onnx_model, manifest, tensors, weight_of_module)
        onnx.checker.check_model(onnx_model)
        onnx.save(onnx_model, str(onnx_dir / "model.onnx"))
        for f in sorted(onnx_dir.iterdir()):
            shutil.copy(f, out_dir / f.name)
    return stored
