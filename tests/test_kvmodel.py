"""The architecture model of the whole KV cache, checked against the real server: its own KV buffer lines for 1, 2, 4
and 8 slots, with and without a unified cache, f16 and q8_0; and its total memory after load."""

from __future__ import annotations

import pytest
from kvbatch.measure.kvmodel import (
    GEMMA3_12B,
    GEMMA3_270M,
    KIB,
    KvCacheTypes,
    architecture_from_gguf,
    architecture_from_metadata,
    kv_bytes_per_token,
    kv_cache,
)
from kvbatch.serve.config import ServerConfig
from kvbatch.serve.layout import SlotLayout
from kvbatch.serve.probes import ProcessRssProbe
from kvbatch.serve.server import EmbeddedServer, default_model_path
from ollama_fixtures import GEMMA3_270M_MODEL_INFO as MODEL_INFO

MIB = 2**20


def test_gemma3_270m_from_its_gguf_file():
    arch = architecture_from_gguf(default_model_path())
    assert arch == GEMMA3_270M
    assert kv_bytes_per_token(arch) == 3 * KIB
    assert kv_bytes_per_token(arch, KvCacheTypes(swa_full=True)) == 18 * KIB


def test_gemma3_12b_global_layers_cost_64_kib_per_token():
    assert len(GEMMA3_12B.global_layers) == 8
    assert kv_bytes_per_token(GEMMA3_12B) == 64 * KIB
    assert kv_bytes_per_token(GEMMA3_12B, KvCacheTypes(swa_full=True)) == 384 * KIB


def test_the_synthetic_12b_shape_has_the_real_12bs_attention():
    from kvbatch.measure.synthetic import GEMMA3_12B_SHAPE

    assert GEMMA3_12B_SHAPE.architecture == GEMMA3_12B


def test_gemma3_12b_at_16_slots_the_sliding_window_is_twice_the_global_cache():
    cache = kv_cache(GEMMA3_12B, SlotLayout(16, 3840))
    assert cache.global_bytes == 64 * KIB * 61440 == 3.75 * 2**30
    assert cache.sliding_bytes == 40 * 8 * KIB * 1536 * 16 == 7.5 * 2**30  # 480 MiB of window cells per slot
    assert cache.cache_bytes == 11.25 * 2**30


def test_quantized_cache_types():
    assert kv_bytes_per_token(GEMMA3_270M, KvCacheTypes("q8_0", "q8_0")) == 3 * KIB * 34 / 32 / 2
    assert kv_bytes_per_token(GEMMA3_270M, KvCacheTypes("q4_0", "q4_0")) == 3 * KIB * 18 / 32 / 2


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
    assert kv_cache(arch, SlotLayout(4, 2048)).cache_bytes == 128 * KIB * 8192


LAYOUTS = [(slots, unified, kind) for kind in ("f16", "q8_0") for unified in (False, True) for slots in (1, 2, 4, 8)]


@pytest.mark.parametrize(("slots", "unified", "kind"), LAYOUTS,
                         ids=[f"{s}slot-{'unified' if u else 'split'}-{k}" for s, u, k in LAYOUTS])  # fmt: skip
def test_the_whole_cache_matches_the_server_log(slots, unified, kind):
    layout = SlotLayout(slots, 2048)
    config = ServerConfig(context_tokens=layout.total_context_tokens, parallel_slots=slots, kv_unified=unified,
                          cache_type_k=kind, cache_type_v=kind, flash_attention="on")  # fmt: skip
    with EmbeddedServer(config) as server:
        logged = server.log().kv_total_bytes
    predicted = kv_cache(GEMMA3_270M, layout, KvCacheTypes(kind, kind), unified=unified).cache_bytes
    assert logged > 0
    assert abs(predicted / logged - 1) < 0.02, (predicted / MIB, logged / MIB)


def test_base_plus_whole_cache_matches_the_servers_memory_after_load():
    with EmbeddedServer(ServerConfig(context_tokens=1024)) as server:
        base = ProcessRssProbe(server.pid).read() - server.log().kv_total_bytes
    for layout in (SlotLayout(1, 16384), SlotLayout(4, 4096), SlotLayout(8, 3584)):
        config = ServerConfig(context_tokens=layout.total_context_tokens, parallel_slots=layout.slots)
        with EmbeddedServer(config) as server:
            measured = ProcessRssProbe(server.pid).read()
        predicted = base + kv_cache(GEMMA3_270M, layout).cache_bytes
        assert abs(predicted / measured - 1) < 0.05, (layout, predicted / MIB, measured / MIB)


@pytest.fixture(scope="module")
def gemma3_12b_attention(tmp_path_factory):
    """A file with the 12B's attention (8 KV heads of 256, a 1,024-token window), 6 layers, random weights."""
    from kvbatch.measure.synthetic import gemma3_12b_like, write_gemma3_gguf

    shape = gemma3_12b_like(6, embedding=256, feed_forward=512)
    return write_gemma3_gguf(tmp_path_factory.mktemp("synthetic") / "gemma3-12b-like.gguf", shape), shape


@pytest.mark.parametrize("slots", [1, 4, 16])
def test_the_model_holds_beyond_the_270m_on_a_12b_shaped_file(gemma3_12b_attention, slots):
    path, shape = gemma3_12b_attention
    arch = architecture_from_gguf(path)
    assert arch == shape.architecture and arch.sliding_window == 1024 and arch.head_count_kv == 8
    layout = SlotLayout(slots, 3840)
    config = ServerConfig(model_path=path, context_tokens=layout.total_context_tokens, parallel_slots=slots)
    with EmbeddedServer(config) as server:
        logged = server.log().kv_total_bytes
    cache = kv_cache(arch, layout)
    assert cache.sliding_cells_per_slot == 1536  # the 12B's window + a micro-batch, per slot
    assert abs(cache.cache_bytes / logged - 1) < 0.02, (cache.cache_bytes / MIB, logged / MIB)
