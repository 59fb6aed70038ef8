"""Recorded Ollama replies: `/api/show` `model_info` for gemma3:270m and gemma3:12b (the same keys as their GGUF)."""

from __future__ import annotations

GEMMA3_270M_MODEL_INFO = {
    "general.architecture": "gemma3",
    "gemma3.block_count": 18,
    "gemma3.attention.head_count": 4,
    "gemma3.attention.head_count_kv": 1,
    "gemma3.attention.key_length": 256,
    "gemma3.attention.value_length": 256,
    "gemma3.attention.sliding_window": 512,
    "gemma3.context_length": 32768,
    "gemma3.embedding_length": 640,
}
GEMMA3_12B_MODEL_INFO = {
    "general.architecture": "gemma3",
    "general.parameter_count": 11766034176,
    "gemma3.block_count": 48,
    "gemma3.attention.head_count": 16,
    "gemma3.attention.head_count_kv": 8,
    "gemma3.attention.key_length": 256,
    "gemma3.attention.value_length": 256,
    "gemma3.attention.sliding_window": 1024,
    "gemma3.context_length": 131072,
    "gemma3.embedding_length": 3840,
    "gemma3.feed_forward_length": 15360,
}
