"""Qwen3: Llama's layer plus per-head RMSNorms on q and k (after the projections, so the input
folds into q/k columns stay exact)."""

from haloquant.families.base import LLAMA_NORM_FEEDS, LLAMA_ROWS_FEEDS, Family

FAMILY = Family("qwen3", ("Qwen3ForCausalLM",), LLAMA_NORM_FEEDS, LLAMA_ROWS_FEEDS)
