"""Architecture prediction of KV bytes per token, from the GGUF file, Ollama's model_info and known shapes."""

from __future__ import annotations

from kvbatch.measure.kvmodel import (
    GEMMA3_12B,
    GEMMA3_270M,
    KIB,
    architecture_from_gguf,
    architecture_from_metadata,
    kv_bytes_per_token,
    predicted_kv_bytes,
)
from kvbatch.serve.server import default_model_path
from ollama_double import MODEL_INFO


def test_gemma3_270m_from_its_gguf_file():
    arch = architecture_from_gguf(default_model_path())
    assert arch == GEMMA3_270M
    assert kv_bytes_per_token(arch) == 3 * KIB
    assert kv_bytes_per_token(arch, swa_full=True) == 18 * KIB


def test_gemma3_12b_global_layers_cost_64_kib_per_token():
    assert len(GEMMA3_12B.global_layers) == 8
    assert kv_bytes_per_token(GEMMA3_12B) == 64 * KIB
    assert kv_bytes_per_token(GEMMA3_12B, swa_full=True) == 384 * KIB


def test_quantized_cache_types():
    assert kv_bytes_per_token(GEMMA3_270M, cache_type_k="q8_0", cache_type_v="q8_0") == 3 * KIB * 34 / 32 / 2
    assert kv_bytes_per_token(GEMMA3_270M, cache_type_k="q4_0", cache_type_v="q4_0") == 3 * KIB * 18 / 32 / 2


def test_whole_cache_matches_the_server_log_at_load():
    # llama-server logged 24 MiB (full) + 30 MiB (SWA) for -c 8192 -np 2 (see test_server)
    assert predicted_kv_bytes(GEMMA3_270M, 8192, parallel_slots=2) == 54 * 2**20


def test_same_keys_from_ollama_model_info():
    assert architecture_from_metadata(MODEL_INFO) == GEMMA3_270M


def test_a_model_without_sliding_window_counts_every_layer():
    info = {
        "general.architecture": "llama",
        "llama.block_count": 32,
        "llama.attention.head_count": 32,
        "llama.attention.head_count_kv": 8,
        "llama.embedding_length": 4096,
    }
    arch = architecture_from_metadata(info)
    assert kv_bytes_per_token(arch) == 32 * 8 * (128 + 128) * 2  # Llama 3 8B: 128 KiB/token
