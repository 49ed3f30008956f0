"""ONNX export: optimum exports the model holding the decoded quantized weights; then every
quantized linear becomes a `com.microsoft.MatMulNBits` node and the quantized embedding a
`GatherBlockQuantized` node carrying the *same* integer codes, scales and zero points as the GGUF —
nothing is re-quantized, no float copy of a quantized weight stays in the file.

onnxruntime's kernels take 2-, 4- and 8-bit codes in groups of 16–256; MatMulNBits refuses 8-bit
codes with float zero points (and runs 4-bit ones on a slow path) and GatherBlockQuantized any
non-default zero point, so there a format's own zero point (Q4_1's and Q5_1's min, Q4_K's and Q5_K's
dmin·m) is carried as a per-block offset: (x summed per block) · offsetᵀ beside the MatMulNBits,
or a gathered offset added to the lookup. 3-bit codes are held as
4-bit, 5- and 6-bit as 8-bit, IQ4's table values (−127…113) as 8-bit codes + 128. The folder also
holds genai_config.json, so onnxruntime-genai's generator runs it with its KV cache.
"""

from __future__ import annotations

import json
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
from haloquant.modelio import load_tokenizer
from haloquant.onnx_layout import has_default_zero, integer_zero_form, ort_supports, to_default_zero, valid_group
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


def matmul_nbits(node: onnx.NodeProto, blocks: AffineBlocks, prefix: str) -> tuple[onnx.NodeProto, list]:
    blocks = to_default_zero(blocks)
    n, groups, group = blocks.q.shape
    inits = [numpy_helper.from_array(pack_codes(blocks.q, blocks.bits), f"{prefix}.qweight"),
             numpy_helper.from_array(blocks.scale.reshape(-1).astype(np.float32), f"{prefix}.scales")]
    if has_default_zero(blocks):
        pass  # MatMulNBits' own default zero point: none stored
    elif blocks.zero_is_integer:
        inits.append(numpy_helper.from_array(pack_zero_points(np.rint(blocks.zero), blocks.bits), f"{prefix}.zeros"))
    else:
        inits.append(numpy_helper.from_array(blocks.zero.reshape(-1).astype(np.float32), f"{prefix}.zeros"))
    new = helper.make_node("MatMulNBits", [node.input[0]] + [i.name for i in inits], list(node.output),
                           name=f"{node.name}_Q{blocks.bits}", domain=MS_DOMAIN,
                           K=groups * group, N=n, bits=blocks.bits, block_size=group)
    return new, inits


def quantized_gather(node: onnx.NodeProto, blocks: AffineBlocks, prefix: str) -> tuple[list, list, str]:
    """An embedding Gather → onnxruntime's GatherBlockQuantized over the same codes and scales,
    stored exactly as a MatMulNBits of this weight stores them — (rows, groups, bytes per group)
    codes, flat scales, (rows, groups) offsets — so a tied head and the lookup share every
    initializer (dedupe_initializers). It decodes (u − D)·scale with D its fixed zero point, so a
    format's own zero point comes back as a gathered per-block offset (integer_zero_form)."""
    integer, offset = integer_zero_form(blocks)
    rows, groups, group = integer.q.shape
    inits = [numpy_helper.from_array(pack_codes(integer.q, integer.bits), f"{prefix}.qweight"),
             numpy_helper.from_array(integer.scale.reshape(-1).astype(np.float32), f"{prefix}.scales"),
             numpy_helper.from_array(np.array([rows, groups, 1], np.int64), f"{prefix}.per_group"),
             numpy_helper.from_array(np.array([0, 0, groups, 1], np.int64), f"{prefix}.rows_per_group"),
             numpy_helper.from_array(np.array([0, 0, groups * group], np.int64), f"{prefix}.flat")]
    decoded = f"{prefix}.decoded_groups"
    nodes = [helper.make_node("Reshape", [f"{prefix}.scales", f"{prefix}.per_group"], [f"{prefix}.group_scales"]),
             helper.make_node("GatherBlockQuantized", [inits[0].name, node.input[1], f"{prefix}.group_scales"],
                              [decoded], name=f"{node.name}_Q{integer.bits}", domain=MS_DOMAIN, gather_axis=0,
                              quantize_axis=2, block_size=group, bits=integer.bits)]
    how = f"GatherBlockQuantized bits={integer.bits} block={group}"
    if offset.any():
        inits.append(numpy_helper.from_array(offset, f"{prefix}.offsets"))
        nodes += [helper.make_node("Gather", [f"{prefix}.offsets", node.input[1]], [f"{prefix}.offset_rows"]),
                  helper.make_node("Reshape", [f"{prefix}.offset_rows", f"{prefix}.rows_per_group"],
                                   [f"{prefix}.offset_groups"]),
                  helper.make_node("Add", [decoded, f"{prefix}.offset_groups"], [f"{prefix}.summed_groups"])]
        decoded = f"{prefix}.summed_groups"
        how += " + per-block offset"
    nodes.append(helper.make_node("Reshape", [decoded, f"{prefix}.flat"], [node.output[0]]))
    return nodes, inits, how


def dedupe_initializers(graph: onnx.GraphProto) -> None:
    """Initializers with the same type, shape and bytes become one (a tied head's codes and the
    embedding lookup's): the file holds each quantized weight once."""
    seen: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    keep = []
    for init in graph.initializer:
        key = (init.data_type, tuple(init.dims), init.raw_data) if init.raw_data and not init.name.endswith(".zeros") \
            else None
        if key is not None and key in seen:
            rename[init.name] = seen[key]
            continue
        if key is not None:
            seen[key] = init.name
        keep.append(init)
    if not rename:
        return
    del graph.initializer[:]
    graph.initializer.extend(keep)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]


def matmul_nbits_with_offset(node: onnx.NodeProto, integer: AffineBlocks, offset: np.ndarray,
                             prefix: str) -> tuple[list, list]:
    """x·Wᵀ with W = (u − D)·scale + offset per block (integer_zero_form): MatMulNBits on the integer
    part, and the offset's share as (x summed within each block) · offsetᵀ — one small float MatMul
    of K/group columns."""
    n, groups, group = integer.q.shape
    base = f"{prefix}.integer_part"
    inits = [numpy_helper.from_array(pack_codes(integer.q, integer.bits), f"{prefix}.qweight"),
             numpy_helper.from_array(integer.scale.reshape(-1).astype(np.float32), f"{prefix}.scales"),
             numpy_helper.from_array(offset, f"{prefix}.offsets"),  # (rows, groups): as the lookup's
             numpy_helper.from_array(np.array([0, 0, groups, group], np.int64), f"{prefix}.blocked"),
             numpy_helper.from_array(np.array([-1], np.int64), f"{prefix}.last_axis")]
    x = node.input[0]
    nodes = [helper.make_node("MatMulNBits", [x, inits[0].name, inits[1].name], [base],
                              name=f"{node.name}_Q{integer.bits}", domain=MS_DOMAIN, K=groups * group, N=n,
                              bits=integer.bits, block_size=group),
             helper.make_node("Reshape", [x, f"{prefix}.blocked"], [f"{prefix}.x_blocked"]),
             helper.make_node("ReduceSum", [f"{prefix}.x_blocked", f"{prefix}.last_axis"], [f"{prefix}.x_sums"],
                              keepdims=0),
             helper.make_node("Transpose", [f"{prefix}.offsets"], [f"{prefix}.offsets_t"], perm=[1, 0]),
             helper.make_node("MatMul", [f"{prefix}.x_sums", f"{prefix}.offsets_t"], [f"{prefix}.offset_part"]),
             helper.make_node("Add", [base, f"{prefix}.offset_part"], list(node.output))]
    return nodes, inits


def set_accuracy_level(model: onnx.ModelProto, level: int) -> None:
    """export.onnx.accuracy_level on every MatMulNBits: how onnxruntime computes with the codes
    (0: float32 activations; 4: int8 activations, quantized per block as it runs). The codes,
    scales and zero points stored are the same at every level."""
    if level == 0:
        return  # onnxruntime's default: no attribute
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            node.attribute.append(helper.make_attribute("accuracy_level", level))


def _module_of(node_name: str) -> str:
    """optimum's node names carry the module path: /model/layers.0/mlp/up_proj/MatMul."""
    return node_name.strip("/").rsplit("/", 1)[0].replace("/", ".")


def _initializer_transposes(graph, inits: dict) -> dict[str, str]:
    """Output → initializer of each 2-D Transpose node over an initializer: how torch's exporter can
    leave a tied head's weight (MatMul(x, Transpose(embedding))) instead of a folded transposed copy."""
    out = {}
    for n in graph.node:
        perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), [1, 0])
        if n.op_type == "Transpose" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2 and perm == [1, 0]:
            out[n.output[0]] = n.input[0]
    return out


WEIGHT_PARTS = (".qweight", ".scales", ".zeros", ".offsets")  # the initializers holding a quantized weight


def rewrite_linears(model: onnx.ModelProto, manifest: QuantizedManifest, tensors: dict[str, np.ndarray],
                    weight_of_module: dict[str, str]) -> tuple[dict[str, str], int]:
    """Replace MatMuls and the embedding Gather of quantized weights by MatMulNBits and
    GatherBlockQuantized in place; returns module → how stored, and the bytes of the initializers
    that hold quantized weights (what haloquant/onnx_layout.py predicts for the allocation)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    qinfo = {q.name: q for q in manifest.quantized}
    transposes = _initializer_transposes(graph, inits)
    stored: dict[str, str] = {}
    float_weights: set[str] = set()
    new_nodes = []
    for node in graph.node:
        module = _module_of(node.name)
        wname = weight_of_module.get(module)
        if node.op_type == "Gather" and node.input[0] in inits and node.input[0] in qinfo:
            stored[module] = _rewrite_gather(node, qinfo[node.input[0]], tensors, inits, graph, new_nodes, module)
            if "float32" in stored[module]:
                float_weights.add(node.input[0])
            continue
        weight_input = node.input[1] if node.op_type == "MatMul" else None
        if wname not in qinfo or not (weight_input in inits or weight_input in transposes):
            new_nodes.append(node)
            continue
        if weight_input in inits:  # the transposed weight, folded by the exporter
            exported, float_name = numpy_helper.to_array(inits[weight_input]), weight_input
        else:  # Transpose(weight) in the graph: a tied head exported with accelerate installed
            float_name = transposes[weight_input]
            exported = numpy_helper.to_array(inits[float_name]).T
        stored[module] = _rewrite_matmul(node, qinfo[wname], tensors, exported, graph, new_nodes, module)
        if "float32" in stored[module]:
            float_weights.add(float_name)
    still_read = {i for n in new_nodes for i in n.input} | {o.name for o in graph.output}
    del graph.node[:]  # a Transpose whose MatMul now reads codes goes with its float weight
    graph.node.extend(n for n in new_nodes if not (n.op_type == "Transpose" and n.output[0] in transposes
                                                    and n.output[0] not in still_read))
    dedupe_initializers(graph)
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    weight_bytes = sum(numpy_helper.to_array(i).nbytes for i in graph.initializer
                       if i.name in float_weights or i.name.endswith(WEIGHT_PARTS))
    return stored, weight_bytes


GENAI_CONFIG = "genai_config.json"


def _special_ids(model, tokenizer) -> tuple[int, int | list[int], int]:
    """(bos, eos, pad) as the builder resolves them: generation_config, then config, then the
    tokenizer; EOS also holds the tokenizer's own end token (a chat model's end of turn, e.g. Qwen's
    <|im_end|>, where config.json names only <|endoftext|>); the generator needs numbers, so a
    missing BOS becomes the builder's 1 and a missing pad the first EOS."""
    def resolve(attr):
        for source in (model.generation_config, model.config, tokenizer):
            value = getattr(source, attr, None) if source is not None else None
            if value is not None:
                return value
        return None

    eos = resolve("eos_token_id")
    if eos is None:
        raise HaloquantError("export_onnx: no eos_token_id in generation_config.json, config.json or the tokenizer")
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    turn_end = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if turn_end is not None and turn_end not in eos:
        eos.append(turn_end)
    bos, pad = resolve("bos_token_id"), resolve("pad_token_id")
    return (1 if bos is None else bos), (eos[0] if len(eos) == 1 else eos), (eos[0] if pad is None else pad)


def genai_config(model, tokenizer, onnx_file: str) -> dict:
    """onnxruntime-genai's description of the decoder graph (genai_config.json), in the form its
    model builder writes for a graph it did not build (its config-only mode: that builder itself needs
    transformers ≥ 5 to import, so the same fields are filled here from the model's config).
    optimum's inputs and outputs already carry the names the generator expects; the model type is
    the config's (llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3: the generator's own)."""
    cfg = model.config
    heads = cfg.num_attention_heads
    bos, eos, pad = _special_ids(model, tokenizer)
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": cfg.max_position_embeddings,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": onnx_file,
                "head_size": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
                "hidden_size": cfg.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": heads,
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_key_value_heads": getattr(cfg, "num_key_value_heads", None) or heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": cfg.model_type,
            "vocab_size": cfg.vocab_size,
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": cfg.max_position_embeddings, "min_length": 0, "no_repeat_ngram_size": 0,
                   "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": False,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0},
    }


def _blocks(q, tensors, exported: np.ndarray, module: str, transposed: bool) -> AffineBlocks | None:
    """The artifact's codes of a weight as blocks, after checking that optimum exported that weight
    decoded (a MatMul's initializer is the transposed weight, a Gather's the weight)."""
    fmt = get_format(q.format)
    expected = fmt.decode(tensors[q.name], q.shape)
    if transposed:
        expected = expected.T
    if exported.shape != expected.shape or not np.array_equal(exported, expected):
        raise HaloquantError(f"export_onnx: exported weight of {module} differs from the quantized artifact")
    blocks = fmt.affine_blocks(tensors[q.name], q.shape)
    return blocks if blocks is not None and valid_group(blocks.q.shape[-1]) else None


def _rewrite_matmul(node, q, tensors, exported: np.ndarray, graph, new_nodes, module) -> str:
    """A linear of a quantized weight (`exported`: the MatMul's transposed float weight) as MatMulNBits
    over its codes; returns how it is stored."""
    blocks = _blocks(q, tensors, exported, module, transposed=True)
    if blocks is None:
        new_nodes.append(node)
        return f"{q.format}: MatMul float32 (no onnxruntime integer kernel for it)"
    group = blocks.q.shape[-1]
    if ort_supports(blocks):
        nb_node, new_inits = matmul_nbits(node, blocks, module)
        nodes = [nb_node]
        how = f"MatMulNBits bits={blocks.bits} block={group}"
    else:  # 4- or 8-bit codes with a float zero point, or table-indexed codes
        integer, offset = integer_zero_form(blocks)
        how = f"MatMulNBits bits={integer.bits} block={group}"
        if offset.any():
            nodes, new_inits = matmul_nbits_with_offset(node, integer, offset, module)
            how += " + per-block offset"
        else:  # IQ4: table values + 128 with the default zero point are the weight
            nb_node, new_inits = matmul_nbits(node, integer, module)
            nodes = [nb_node]
    graph.initializer.extend(new_inits)
    new_nodes.extend(nodes)
    return f"{q.format}: {how}"


def _rewrite_gather(node, q, tensors, inits, graph, new_nodes, module) -> str:
    """The embedding lookup of a quantized weight as GatherBlockQuantized over its codes."""
    blocks = _blocks(q, tensors, numpy_helper.to_array(inits[node.input[0]]), module, transposed=False)
    if blocks is None:
        new_nodes.append(node)
        return f"{q.format}: Gather float32 (no block-quantized gather for it)"
    nodes, new_inits, how = quantized_gather(node, blocks, module)
    graph.initializer.extend(new_inits)
    new_nodes.extend(nodes)
    return f"{q.format}: {how}"


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
                      out_dir: Path, opset: int, accuracy_level: int = 0) -> tuple[dict[str, str], int]:
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
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                  "generation_config.json"):
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
        stored, weight_bytes = rewrite_linears(onnx_model, manifest, tensors, weight_of_module)
        set_accuracy_level(onnx_model, accuracy_level)
        onnx.checker.check_model(onnx_model)
        onnx.save(onnx_model, str(onnx_dir / "model.onnx"))
        for f in sorted(onnx_dir.iterdir()):
            shutil.copy(f, out_dir / f.name)
        config = genai_config(model, load_tokenizer(tokenizer_dir), "model.onnx")
        (out_dir / GENAI_CONFIG).write_text(json.dumps(config, indent=2))
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            if (hf_dir / f).is_file():  # the generator's tokenizer reads them from the model folder
                shutil.copy(hf_dir / f, out_dir / f)
    return stored, weight_bytes
