"""Gemma 2 and Gemma 3 (text): RMSNorm scales by (1 + w); the embedding is multiplied by √hidden;
four norms per layer — the MLP's input norm is pre_feedforward_layernorm, while
post_attention_layernorm and post_feedforward_layernorm normalise the sublayer *outputs* (they
feed no linear). Gemma 3 adds per-head q/k norms."""

from haloquant.families.base import LLAMA_ROWS_FEEDS, Family, NormFeeds, sqrt_hidden

GEMMA_NORM_FEEDS = (
    NormFeeds("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "attn_in"),
    NormFeeds("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp_in"),
)

GEMMA_POST_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")

GEMMA2 = Family("gemma2", ("Gemma2ForCausalLM",), GEMMA_NORM_FEEDS, LLAMA_ROWS_FEEDS, norm_offset=1.0,
                embedding_scale=sqrt_hidden, post_norms=GEMMA_POST_NORMS)
GEMMA3 = Family("gemma3", ("Gemma3ForCausalLM",), GEMMA_NORM_FEEDS, LLAMA_ROWS_FEEDS, norm_offset=1.0,
                embedding_scale=sqrt_hidden, post_norms=GEMMA_POST_NORMS)
