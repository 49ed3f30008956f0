"""Hugging Face causal-LM folders: loading, the inventory of quantizable tensors, GGUF names.

haloquant quantizes every 2-D weight of the decoder (attention and MLP projections, fused ones
included, the token embedding and an untied output head); 1-D tensors (norms, biases) stay
float32 as in llama.cpp. A folder's family (haloquant/families) is looked up by its HF
architecture; GGUF names are those llama.cpp's converter gives that architecture.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch

from haloquant import HaloquantError
from haloquant.families import architecture_of, family_of_architecture
from haloquant.families.base import head_dim  # noqa: F401  (re-exported: used across the library)
from haloquant.hfcompat import model_view
from haloquant.streaming import stream_blocks

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # a fast tokenizer, or SentencePiece's model
MISTRAL_REGEX_MODEL_TYPES = ("mistral", "mistral3", "voxtral", "ministral", "pixtral")  # transformers' list


@dataclass(frozen=True)
class TensorInfo:
    """One quantizable weight matrix."""

    name: str  # HF parameter name, e.g. model.layers.0.self_attn.q_proj.weight
    gguf_name: str  # e.g. blk.0.attn_q.weight
    shape: tuple[int, int]  # (out_features, in_features) — rows are GGUF rows
    layer: int  # decoder block index; -1 for embedding / output
    kind: str  # GGUF role: attn_q, attn_k, attn_v, attn_qkv, attn_output, ffn_gate, ffn_up, ffn_down,
    #            token_embd, output
    tied: bool = False  # a token embedding that is also the output head (one weight, two roles)

    @property
    def n_weights(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def module(self) -> str:
        return self.name.removesuffix(".weight")


def model_name(path: str | Path) -> str:
    """The model's name in artifacts and the GGUF: its folder's, or for a rotated copy its source's
    (haloquant/rotation.py records it), since the copy computes the same model."""
    path = Path(path)
    record = path / "rotation.json"
    if record.is_file():
        source = json.loads(record.read_text()).get("source")
        if isinstance(source, str) and source:
            return source
    return path.name


def read_config(path: Path) -> dict:
    p = Path(path) / "config.json"
    try:
        cfg = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HaloquantError(f"model.path: {p} is not readable JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise HaloquantError(f"model.path: {p} is not a JSON object")
    return cfg


def check_model_dir(path: str | Path) -> Path:
    """Fail early and clearly on a missing, incomplete or unsupported model folder."""
    p = Path(path)
    if not p.is_dir():
        raise HaloquantError(f"model.path: folder {str(p)!r} does not exist")
    if not (p / "config.json").is_file():
        raise HaloquantError(f"model.path: {str(p)!r} has no config.json (expected a Hugging Face model folder)")
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise HaloquantError(f"model.path: {str(p)!r} has no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise HaloquantError(f"model.path: {str(p)!r} holds no weights (*.safetensors or *.bin)")
    archs = read_config(p).get("architectures") or [None]
    family_of_architecture(archs[0])
    return p


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HaloquantError(f"model.device: {device!r} requested but CUDA is not available")
    return torch.device(device)


def load_config(path: str | Path):
    from transformers import AutoConfig

    with model_view(check_model_dir(path)) as view:
        return AutoConfig.from_pretrained(view)


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16}


def _shard_dtypes_and_elements(path: Path) -> tuple[set[str], int]:
    """The dtypes of the shards' tensors and how many elements they hold (headers only)."""
    from safetensors import safe_open

    found, elements = set(), 0
    for shard in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                found.add(sl.get_dtype())
                elements += math.prod(sl.get_shape())
    return found, elements


def stored_dtype(path: Path) -> torch.dtype:
    """The dtype the weights are stored in: bf16/fp16 when every floating tensor of the shards is,
    else float32 (config.json's torch_dtype is not trusted: a float32 file may claim bf16)."""
    floats = _shard_dtypes_and_elements(path)[0] & {"F64", "F32", "F16", "BF16"}
    return _SAFETENSORS_DTYPES[floats.pop()] if len(floats) == 1 and floats <= set(_SAFETENSORS_DTYPES) \
        else torch.float32


def memory_bytes(device: torch.device) -> int:
    """What a model may use on `device`: a GPU's total memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62  # not Linux: never stream by default


def should_stream(path: Path, device: torch.device, stream: bool | str = "auto") -> bool:
    """model.stream: True, False, or "auto" — stream when the model in float32 would take more
    than half of `device`'s memory (haloquant/streaming.py)."""
    if stream != "auto":
        return bool(stream)
    return 4 * _shard_dtypes_and_elements(path)[1] > memory_bytes(device) // 2


def load_model(path: str | Path, device: str = "auto", stream: bool | str = False):
    """Load a causal LM to compute in float32 (quantization error is measured against exact float
    weights).

    A bf16/fp16 checkpoint is read in its own dtype and widened on the device (exact). `stream`
    (model.stream; "auto": see should_stream): the decoder blocks stay on the host in that dtype
    and run on the device one at a time (haloquant/streaming.py) — the same numbers, a block's
    weights in float32 on the device at a time."""
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    with model_view(check_model_dir(path)) as view:
        streaming = should_stream(Path(view), dev, stream)
        model = AutoModelForCausalLM.from_pretrained(view, dtype=stored_dtype(Path(view)))
    if streaming:
        return stream_blocks(model.eval(), dev)
    return model.to(dev).float().eval()


def model_skeleton(path: str | Path):
    """The model's modules and parameter shapes without its weights (on the meta device): for
    inventories (quantizable_tensors) of any size in no time and no memory."""
    from transformers import AutoModelForCausalLM

    with model_view(check_model_dir(path)) as view, torch.device("meta"):
        return AutoModelForCausalLM.from_config(load_config(view))


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks of a Hugging Face causal LM (model.model.layers in every registered family)."""
    return model.get_decoder().layers


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    # whole texts are tokenized at once and cut into windows by the callers
    kwargs = {"model_max_length": 1 << 62}
    if read_config(Path(path)).get("model_type") not in MISTRAL_REGEX_MODEL_TYPES:
        # transformers 4.57.3–4.57.6 warn of Mistral's broken pre-tokenizer regex for every local folder
        # saved by those versions (transformers#44031, fixed in 5.x); saying "not Mistral's" silences
        # the false alarm and changes nothing else
        kwargs["fix_mistral_regex"] = False
    with model_view(check_model_dir(path)) as view:
        return AutoTokenizer.from_pretrained(view, **kwargs)


def gguf_arch(model) -> gguf.MODEL_ARCH:
    """The llama.cpp architecture llama.cpp's converter writes this (registered) model as."""
    from haloquant.converter import gguf_arch as converter_arch

    arch = architecture_of(model)
    family_of_architecture(arch)  # refuses an unregistered family first
    return converter_arch(arch)


def output_head_module(model) -> str | None:
    """Module name of the output head (lm_head for every registered family), None if absent."""
    head = model.get_output_embeddings()
    return next((n for n, m in model.named_modules() if m is head), None) if head is not None else None


def quantizable_tensors(model) -> list[TensorInfo]:
    """Every 2-D weight that gets a storage format, in model order; tied output is not repeated."""
    cfg = model.config
    tmap = gguf.get_tensor_name_map(gguf_arch(model), cfg.num_hidden_layers)
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
            raise HaloquantError(f"model.path: llama.cpp has no GGUF name for tensor {name!r} of this architecture")
        base = gname.removesuffix(".weight")
        parts = base.split(".")
        layer = int(parts[1]) if parts[0] == "blk" else -1
        out.append(TensorInfo(name, gname, tuple(param.shape), layer, parts[-1],
                              tied=parts[-1] == "token_embd" and id(param) == head_id))
    return out


def float_tensors(model) -> dict[str, torch.Tensor]:
    """Parameters kept in float32 (norm weights, biases), by HF name, on the host."""
    return {n: p.detach().float().cpu() for n, p in model.named_parameters() if p.ndim != 2}


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
