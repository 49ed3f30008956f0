"""Qwen2 / Qwen2.5: Llama's layer with q/k/v biases (divided with v's rows when v → o is folded).
llama.cpp's qwen2 graph sizes q and o by hidden_size, so a widened copy (haloquant/widening.py) is
written as llama's graph, which takes the same q/k/v biases and sizes q by heads × head_dim."""

from haloquant.families.base import LLAMA_NORM_FEEDS, LLAMA_ROWS_FEEDS, Family

FAMILY = Family("qwen2", ("Qwen2ForCausalLM",), LLAMA_NORM_FEEDS, LLAMA_ROWS_FEEDS,
                widened_gguf_architecture="LlamaForCausalLM")
