"""What haloquant needs to know of a decoder family beyond what llama.cpp's converter knows.

GGUF names, hyper-parameters, tokenizers and every GGUF-side tensor transform come from the
converter (haloquant/converter.py). A family adds the torch-side knowledge:
- the exact Scale-Fold folds: which norm's output is the input of which linears (`NormFeeds`),
  and which linear's output rows are another linear's input columns, elementwise (`RowsFeed`:
  v → o, up → down), with the row range inside a fused linear (Phi-3's qkv_proj, gate_up_proj);
- the norm's form: RMSNorm multiplies by `norm_offset + weight` (Gemma: 1 + w);
- the scale the embedding is multiplied by before the first block (Gemma: √hidden), so that a
  looked-up row's error is counted in residual-stream units;
- for the residual-stream rotation (haloquant/rotation.py): the linears whose outputs are added to
  the stream (`residual_writers`), and the final norm before the head; a family that normalises
  sublayer outputs before adding them (Gemma 2/3's post-norms) cannot be rotated (`post_norms`);
- for widening the stream to whole 256-blocks (haloquant/widening.py): every norm over the stream
  (`norm_feeds`, `post_norms`, the final norm), and whether the GGUF side allows it (`widenable`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable


def head_dim(config) -> int:
    """Per-head width: explicit in newer configs, hidden_size / heads otherwise."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def all_rows(config) -> slice:
    return slice(None)


@dataclass(frozen=True)
class NormFeeds:
    """`norm`'s output is the input of `linears` (names relative to a decoder layer)."""

    norm: str
    linears: tuple[str, ...]
    label: str  # the fold group's name in scales.safetensors: layers.<i>.<label>


@dataclass(frozen=True)
class RowsFeed:
    """Output rows `rows(config)` of `source` are, elementwise, the input columns of `target`."""

    source: str
    target: str
    label: str
    rows: Callable[[object], slice] = all_rows
    per_kv_head: bool = False  # source rows are kv heads, each read by several query heads (GQA)


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]  # HF `architectures` names
    norm_feeds: tuple[NormFeeds, ...]
    rows_feeds: tuple[RowsFeed, ...]
    norm_offset: float = 0.0
    embedding_scale: Callable[[object], float] = field(default=lambda config: 1.0)
    layers: str = "model.layers"  # prefix of decoder layer i: <layers>.<i>.
    residual_writers: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")  # outputs added to the stream
    final_norm: str = "model.norm"  # the norm before the output head
    embedding: str = "model.embed_tokens"
    head: str = "lm_head"
    post_norms: tuple[str, ...] = ()  # norms of sublayer outputs before the residual add (no rotation then)
    # llama.cpp's converter reads head geometry from num_attention_heads and head_dim, not from hidden_size
    # (Phi-3's derives its RoPE width from hidden_size), so the stream can be widened (haloquant/widening.py)
    widenable: bool = True
    # the HF architecture whose llama.cpp conversion a widened copy is written as, where llama.cpp's own graph
    # for the family sizes q and o by hidden_size rather than heads × head_dim (Qwen2: llama's graph, q/k/v biases)
    widened_gguf_architecture: str | None = None
    query: str = "self_attn.q_proj"  # the linear whose rows are the query heads (widening adds zero heads)
    attention_out: str = "self_attn.o_proj"  # the linear whose columns read the heads

    def layer(self, i: int) -> str:
        return f"{self.layers}.{i}"


def sqrt_hidden(config) -> float:
    return math.sqrt(config.hidden_size)


# the Llama-style decoder layer most families share
LLAMA_NORM_FEEDS = (
    NormFeeds("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "attn_in"),
    NormFeeds("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp_in"),
)
LLAMA_ROWS_FEEDS = (
    RowsFeed("self_attn.v_proj", "self_attn.o_proj", "v_o", per_kv_head=True),
    RowsFeed("mlp.up_proj", "mlp.down_proj", "up_down"),
)
