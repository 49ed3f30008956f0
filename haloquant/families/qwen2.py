"""Qwen2 / Qwen2.5: Llama's layer with q/k/v biases (divided with v's rows when v → o is folded)."""

from haloquant.families.base import LLAMA_NORM_FEEDS, LLAMA_ROWS_FEEDS, Family

FAMILY = Family("qwen2", ("Qwen2ForCausalLM",), LLAMA_NORM_FEEDS, LLAMA_ROWS_FEEDS)
