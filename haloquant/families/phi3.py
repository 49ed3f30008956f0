"""Phi-3 / Phi-4-mini: fused projections — qkv_proj holds q, k and v rows in that order and
gate_up_proj holds gate then up rows, so the v → o and up → down folds act on a row range."""

from haloquant.families.base import Family, NormFeeds, RowsFeed, head_dim


def v_rows(config) -> slice:
    hd, n_kv = head_dim(config), config.num_key_value_heads or config.num_attention_heads
    q = config.num_attention_heads * hd
    return slice(q + n_kv * hd, q + 2 * n_kv * hd)


def up_rows(config) -> slice:
    return slice(config.intermediate_size, 2 * config.intermediate_size)


FAMILY = Family(
    "phi3", ("Phi3ForCausalLM",),
    (NormFeeds("input_layernorm", ("self_attn.qkv_proj",), "attn_in"),
     NormFeeds("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp_in")),
    (RowsFeed("self_attn.qkv_proj", "self_attn.o_proj", "v_o", rows=v_rows, per_kv_head=True),
     RowsFeed("mlp.gate_up_proj", "mlp.down_proj", "up_down", rows=up_rows)),
    widenable=False,  # the converter writes RoPE's width as hidden_size / heads; Phi-3's widths are 256-multiples
)
