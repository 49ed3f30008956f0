"""Llama 2/3.x, Mistral, SmolLM: the reference decoder (RMSNorm w, SwiGLU, GQA, optional biases)."""

from haloquant.families.base import LLAMA_NORM_FEEDS, LLAMA_ROWS_FEEDS, Family

FAMILY = Family("llama", ("LlamaForCausalLM", "MistralForCausalLM"), LLAMA_NORM_FEEDS, LLAMA_ROWS_FEEDS)
