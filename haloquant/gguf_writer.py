"""Write a llama.cpp GGUF from the quantized artifact, with the metadata unmodified llama.cpp needs.

Tensor data is the quantize stage's block bytes, untouched, except that attn_q/attn_k rows are
permuted into llama.cpp's rotary layout (as its converter does). Rows are independent blocks in
every format, so permuting rows of the encoded bytes is exact.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import gguf
import numpy as np

from haloquant import HaloquantError
from haloquant.artifacts import atomic_path
from haloquant.formats import get_format
from haloquant.modelio import gguf_arch, head_dim
from schemas.artifacts import QuantizedManifest


def permute_rope_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k layout → llama.cpp's interleaved layout (convert_hf_to_gguf `permute`)."""
    return (rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:])
            .swapaxes(1, 2).reshape(rows.shape))


def _tokenizer_metadata(writer: gguf.GGUFWriter, model_dir: Path, config) -> None:
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    model = tok.get("model", {})
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise HaloquantError(f"model.path: {model_dir}/tokenizer.json is not a byte-level BPE tokenizer; "
                             "only GPT-2-style BPE vocabularies are exported for now")
    vocab = dict(model["vocab"])
    special = {t["id"]: t["content"] for t in tok.get("added_tokens", [])}
    vocab.update({content: i for i, content in special.items()})
    n_vocab = max(config.vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for content, i in vocab.items():
        tokens[i] = content
        types[i] = gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if config.bos_token_id is not None:
        writer.add_bos_token_id(config.bos_token_id)
        writer.add_add_bos_token(True)
    if config.eos_token_id is not None:
        eos = config.eos_token_id
        writer.add_eos_token_id(eos[0] if isinstance(eos, list) else eos)


def _metadata(w: gguf.GGUFWriter, model_dir: Path, config, name: str, main_format: str) -> None:
    """Every key/value llama.cpp needs: hyper-parameters, file type, tokenizer."""
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    hd = head_dim(config)
    w.add_name(name)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_rope_dimension_count(hd)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(float(getattr(config, "rope_theta", None) or 10000.0))
    if hd * n_head != config.hidden_size:
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{main_format}", gguf.LlamaFileType.GUESSED))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer_metadata(w, model_dir, config)


def gguf_overhead_bytes(model_dir: Path, config, tensors: list[tuple[str, tuple[int, ...]]], name: str) -> int:
    """Upper bound on a GGUF's size beyond its tensor data: header, key/values and tensor infos
    (measured by writing them, exact for these names and metadata; independent of the tensor
    types), plus the most alignment padding the data can take (one alignment per tensor and one
    before the data), plus 64 bytes for a longer general.name."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "header.gguf"
        w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf_arch(config)])
        _metadata(w, model_dir, config, name, "F32")
        for gname, shape in tensors:
            w.add_tensor_info(gname, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        header = path.stat().st_size
    return header + gguf.GGUF_DEFAULT_ALIGNMENT * (len(tensors) + 1) + 64


def write_gguf(path: Path, model_dir: Path, config, manifest: QuantizedManifest,
               tensors: dict[str, np.ndarray], name: str) -> dict[str, int]:
    """Write the GGUF atomically; returns the count of tensors per format."""
    arch = gguf_arch(config)
    rope = getattr(config, "rope_scaling", None) or {}
    if rope and rope.get("rope_type", rope.get("type")) not in (None, "default"):
        raise HaloquantError(f"model.path: rope scaling {rope} is not exported to GGUF yet")
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    tmap = gguf.get_tensor_name_map(arch, config.num_hidden_layers)

    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
        counts = Counter(q.format for q in manifest.quantized)
        _metadata(w, model_dir, config, name, counts.most_common(1)[0][0])

        for q in manifest.quantized:
            data = tensors[q.name]
            if q.gguf_name.endswith("attn_q.weight"):
                data = permute_rope_rows(data, n_head)
            elif q.gguf_name.endswith("attn_k.weight"):
                data = permute_rope_rows(data, n_kv)
            fmt = get_format(q.format)
            w.add_tensor(q.gguf_name, np.ascontiguousarray(data), raw_shape=data.shape, raw_dtype=fmt.ggml_type)
        for n in manifest.float_tensors:
            gname = tmap.get_name(n, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise HaloquantError(f"model.path: no GGUF name for tensor {n!r}")
            w.add_tensor(gname, np.ascontiguousarray(tensors[n], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return dict(counts)
