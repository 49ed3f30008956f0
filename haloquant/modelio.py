"""Hugging Face causal-LM folders: loading, the inventory of quantizable tensors, GGUF names.

haloquant quantizes every 2-D weight of the decoder (attention and MLP projections, the token
embedding and an untied output head); 1-D tensors (norms, biases) stay float32 as in llama.cpp.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch

from haloquant import HaloquantError

# HF model_type → GGUF architecture. Mistral checkpoints are Llama-architecture in llama.cpp.
SUPPORTED_ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA}
REQUIRED_FILES = ("config.json", "tokenizer.json")


@dataclass(frozen=True)
class TensorInfo:
    """One quantizable weight matrix."""

    name: str  # HF parameter name, e.g. model.layers.0.self_attn.q_proj.weight
    gguf_name: str  # e.g. blk.0.attn_q.weight
    shape: tuple[int, int]  # (out_features, in_features) — rows are GGUF rows
    layer: int  # decoder block index; -1 for embedding / output
    kind: str  # attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down, token_embd, output
    tied: bool = False  # a token embedding that is also the output head (one weight, two roles)

    @property
    def n_weights(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def module(self) -> str:
        return self.name.removesuffix(".weight")


def check_model_dir(path: str | Path) -> Path:
    """Fail early and clearly on a missing or unsupported model folder."""
    p = Path(path)
    if not p.is_dir():
        raise HaloquantError(f"model.path: folder {str(p)!r} does not exist")
    for f in REQUIRED_FILES:
        if not (p / f).is_file():
            raise HaloquantError(f"model.path: {str(p)!r} has no {f} (expected a Hugging Face model folder)")
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise HaloquantError(f"model.path: {str(p)!r} holds no weights (*.safetensors or *.bin)")
    cfg = json.loads((p / "config.json").read_text())
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_ARCHS:
        raise HaloquantError(
            f"model.path: architecture {mt!r} is not supported yet; supported: {', '.join(SUPPORTED_ARCHS)}"
        )
    return p


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HaloquantError(f"model.device: {device!r} requested but CUDA is not available")
    return torch.device(device)


def load_model(path: str | Path, device: str = "auto"):
    """Load a causal LM in float32 (quantization error is measured against exact float weights)."""
    from transformers import AutoModelForCausalLM

    p = check_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)
    return model.to(resolve_device(device)).eval()


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    # whole texts are tokenized at once and cut into windows by the callers
    return AutoTokenizer.from_pretrained(check_model_dir(path), model_max_length=1 << 62)


def gguf_arch(config) -> gguf.MODEL_ARCH:
    return SUPPORTED_ARCHS[config.model_type]


_KIND_OF_GGUF = {
    "attn_q": "attn_q", "attn_k": "attn_k", "attn_v": "attn_v", "attn_output": "attn_output",
    "ffn_gate": "ffn_gate", "ffn_up": "ffn_up", "ffn_down": "ffn_down",
    "token_embd": "token_embd", "output": "output",
}


def quantizable_tensors(model) -> list[TensorInfo]:
    """Every 2-D weight that gets a storage format, in model order; tied output is not repeated."""
    cfg = model.config
    tmap = gguf.get_tensor_name_map(gguf_arch(cfg), cfg.num_hidden_layers)
    head = model.get_output_embeddings()
    head_id = id(head.weight) if head is not None else None
    seen: set[int] = set()
    out: list[TensorInfo] = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if param.ndim != 2 or id(param) in seen:
            continue
        seen.add(id(param))
        gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise HaloquantError(f"model.path: no GGUF name for tensor {name!r}; the architecture is not supported")
        base = gname.removesuffix(".weight")
        parts = base.split(".")
        layer = int(parts[1]) if parts[0] == "blk" else -1
        kind = _KIND_OF_GGUF.get(parts[-1])
        if kind is None:
            raise HaloquantError(f"model.path: tensor {name!r} ({gname}) has no known role")
        out.append(TensorInfo(name, gname, tuple(param.shape), layer, kind,
                              tied=kind == "token_embd" and id(param) == head_id))
    return out


def float_tensors(model) -> dict[str, torch.Tensor]:
    """Parameters kept in float32 (norm weights, biases), by HF name."""
    return {n: p.detach() for n, p in model.named_parameters() if p.ndim != 2}


def head_dim(config) -> int:
    """Per-head width: explicit in newer configs, hidden_size / heads otherwise."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
