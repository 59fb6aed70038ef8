"""The estimators' verdict: each estimator's figure checked against a value worked out by hand for one layout (a
broken formula fails), llama-fit-params' table parsed, and the comparison on the real server for the 270M, a
Gemma-3-12B-shaped file and a llama-shaped file written with the gguf writer."""

from __future__ import annotations

import json

import pytest
from kvbatch.measure import estimators as E
from kvbatch.measure.kvmodel import GEMMA3_12B, KvCacheTypes, architecture_from_gguf
from kvbatch.measure.result import load_measurement
from kvbatch.serve.server import default_model_path

MIB = 2**20
F16, Q8 = KvCacheTypes(), KvCacheTypes("q8_0", "q8_0")


def test_each_estimator_matches_its_rule_worked_by_hand_for_the_12b_at_8192_tokens_on_4_slots():
    """Gemma 3 12B: 48 layers (8 global), 8 KV heads of 256, window 1,024. One cell of one layer at f16 is
    8 x (256 + 256) x 2 B = 8 KiB; at q8_0 ggml stores 34 bytes per 32 values, Ollama counts 1 byte."""
    # kvbatch: 8 global layers x 8,192 cells x 8 KiB = 512 MiB; 40 sliding layers x 4 slots x pad256(min(2048,
    # 1024 + 512)) = 1,536 cells x 8 KiB = 1,920 MiB
    assert E.kvbatch_kv_bytes(GEMMA3_12B, F16, 8192, 4) == 2432 * MIB
    # naive: 48 layers x 8,192 cells x 8 KiB, slots and window ignored
    assert E.naive_kv_bytes(GEMMA3_12B, F16, 8192, 4) == 3072 * MIB
    # Ollama (num_ctx 2,048 x OLLAMA_NUM_PARALLEL 4): 8 global layers x 8,192 cells x 8 KiB = 512 MiB; 40 sliding
    # layers x (4 x 1,024 + min(2,048, 512)) = 4,608 cells x 8 KiB = 1,440 MiB
    assert E.ollama_kv_bytes(GEMMA3_12B, F16, 2048, 4) == 1952 * MIB
    assert E.ollama_kv_bytes(GEMMA3_12B, Q8, 2048, 4) == 976 * MIB  # q8_0 as 1 byte: half
    assert E.kvbatch_kv_bytes(GEMMA3_12B, Q8, 8192, 4) == 2432 * MIB * 34 / 64  # ggml's q8_0 blocks
    gemma2 = GEMMA3_12B.__class__(**{**GEMMA3_12B.as_dict(), "architecture": "gemma2"})
    assert E.ollama_kv_bytes(gemma2, F16, 2048, 4) == 3072 * MIB  # only gemma3 gets Ollama's window


BREAKDOWN = """
0.01.346.223 I common_memory_breakdown_print: | memory breakdown [MiB] | total   free    self   model   context   compute    unaccounted |
0.01.346.323 I common_memory_breakdown_print: |   - Host               |                  829 =   222 +      84 +     522                |
0.01.346.324 I common_memory_breakdown_print: |   - CPU_REPACK         |                   12 =    12 +       0 +       0                |
"""  # noqa: E501 (llama-fit-params' own lines, as it prints them for the 270M at 8,192 x 4)


def test_llama_fit_params_breakdown_is_read_per_device_and_summed():
    projected = E.parse_fit_params(BREAKDOWN)
    assert projected == E.FitParams(234 * MIB, 84 * MIB, 522 * MIB) and projected.total_bytes == 840 * MIB
    assert E.parse_fit_params("no table here") is None
    gpu = "|   - CUDA0 (NVIDIA H200)   | 143000 = 140000 + (  3000 =  2500 +   400 +    100) +   0 |"
    assert E.parse_fit_params(gpu) == E.FitParams(2500 * MIB, 400 * MIB, 100 * MIB)  # a card's row: free + (self)


def test_the_verdict_puts_each_figure_beside_the_servers_and_says_what_is_wrong():
    seen = [E.Observed(8192, 4, kv_log_bytes=2432 * MIB, after_load_bytes=10_432 * MIB)]
    projected = E.FitParams(8000 * MIB, 2432 * MIB, 0)
    made = E.verdict(GEMMA3_12B, F16, seen, fit_line=(8000 * MIB, 64 * 1024), fit_params=lambda c, s: projected)
    rows = {r.estimator: r for r in made}
    assert rows["kvbatch"].kv_error == 0 and rows["kvbatch"].total_bytes == 10_432 * MIB
    assert rows["naive (all layers x context)"].kv_error == pytest.approx(3072 / 2432 - 1)
    assert rows["Ollama's rule"].kv_error == pytest.approx(1952 / 2432 - 1)
    assert rows["measured fit"].total_bytes == 8000 * MIB + 64 * 1024 * 8192
    assert rows["llama-fit-params"].total_error == pytest.approx(10_432 / 10_432 - 1)
    said = E.sentences(list(rows.values()), GEMMA3_12B)
    assert said["kvbatch"].endswith("within 2 % at every layout.")
    assert "as if there were no sliding window" in said["naive (all layers x context)"]


def test_on_the_real_server_kvbatch_and_fit_params_give_the_logged_cache_and_the_naive_rule_does_not(tmp_path):
    from kvbatch.measure.synthetic import LlamaShape, gemma3_12b_like, write_gemma3_gguf, write_llama_gguf

    gemma12 = write_gemma3_gguf(tmp_path / "gemma3-12b-like.gguf", gemma3_12b_like(6, embedding=256, feed_forward=512))
    llama = write_llama_gguf(tmp_path / "llama-like.gguf", LlamaShape(4, 256, 8, 2, 512))
    binary = E.fit_params_binary()
    assert binary is not None, "make setup builds llama-fit-params beside llama-server"
    for path, sliding in ((default_model_path(), True), (gemma12, True), (llama, False)):
        arch = architecture_from_gguf(path)
        seen = E.observe_embedded(path, F16, [8192], [1, 4])
        rows = E.verdict(arch, F16, seen, fit_params=lambda c, s, p=path: E.run_fit_params(binary, p, c, s))
        by = {(r.estimator, r.slots): r for r in rows}
        for slots in (1, 4):
            assert abs(by[("kvbatch", slots)].kv_error) < 0.02, (path.name, slots)
            assert abs(by[("llama-fit-params", slots)].kv_error) < 0.02, (path.name, slots)
        naive = by[("naive (all layers x context)", 1)].kv_error
        assert (naive > 0.5) if sliding else abs(naive) < 0.02, (path.name, naive)


def test_a_schema_2_measurement_file_is_migrated_to_schema_3(tmp_path):
    path = tmp_path / "embedded__m.gguf__f16-f16.json"
    path.write_text(json.dumps({"schema_version": 2, "backend": "embedded", "model": "m.gguf",
                                "kv_bytes_per_token": 3072.0, "base_bytes": 3.0e8}))  # fmt: skip
    migrated = load_measurement(path)
    assert migrated.schema_version == 3 and migrated.estimators == [] and migrated.kv_bytes_per_token == 3072.0
