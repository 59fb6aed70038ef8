"""Model files of any Gemma-3 shape with random weights, written with the `gguf` package's writer: the memory model
is checked beyond the 270M (a 12B's 8 KV heads and 1,024-token window), and a GPU check can meet a card's real limit
without downloading a 12B. The tokenizer is copied from the shipped Gemma 3 270M (the same 262,144-token vocabulary),
so the server tokenizes and answers (nonsense, at the real speed of the shape)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvbatch.measure.kvmodel import KvArchitecture


@dataclass(frozen=True)
class Gemma3Shape:
    """Gemma 3's layout: every sixth layer global, the rest sliding-window."""

    block_count: int
    embedding: int
    heads: int
    kv_heads: int
    head_dim: int
    feed_forward: int
    window: int
    context_length: int = 131072

    @property
    def architecture(self) -> KvArchitecture:
        global_layers = tuple(i for i in range(self.block_count) if (i + 1) % 6 == 0)
        return KvArchitecture("gemma3", self.block_count, self.kv_heads, self.head_dim, self.head_dim, self.window,
                              global_layers, self.context_length)  # fmt: skip


GEMMA3_12B_SHAPE = Gemma3Shape(48, 3840, 16, 8, 256, 15360, 1024)
"""The real 12B: 48 layers (8 global), 8 KV heads of 256, a 1,024-token window."""


def gemma3_12b_like(block_count: int, *, embedding: int = 3840, feed_forward: int = 15360) -> Gemma3Shape:
    """The 12B's attention (8 KV heads of 256, window 1,024) with fewer layers or narrower matrices."""
    return Gemma3Shape(block_count, embedding, 16, 8, 256, feed_forward, 1024)


def _tokenizer_fields():
    from gguf import GGUFReader

    from kvbatch.serve.server import default_model_path

    reader = GGUFReader(default_model_path())
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            yield key, field


def _add_tokenizer(writer) -> int:
    """Copy the shipped 270M's tokenizer into `writer`; returns the vocabulary's size."""
    vocab = 0
    for key, field in _tokenizer_fields():
        value = field.contents()
        if key == "tokenizer.ggml.tokens":
            vocab = len(value)
        sub_type = field.types[1] if len(field.types) > 1 else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub_type)
    return vocab


def _write(writer, path: Path) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def _start(path: Path, arch: str, shape, *, rms_eps: float, rope_base: float):
    """A writer with the keys every shape shares (sizes, heads, norms, rope, F16)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"synthetic {arch} {shape.block_count}L {shape.embedding}d")
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.embedding)
    writer.add_block_count(shape.block_count)
    writer.add_feed_forward_length(shape.feed_forward)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_layer_norm_rms_eps(rms_eps)
    writer.add_rope_freq_base(rope_base)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    return writer


def _random_weights(seed: int):
    """Random F16 matrices at the scale of a trained model's, so the server computes (nonsense) at real speed."""
    rng = np.random.default_rng(seed)

    def weight(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    return weight


def write_gemma3_gguf(path: Path, shape: Gemma3Shape, *, seed: int = 0) -> Path:
    """Write a GGUF of this shape with random F16 weights (norms at 1); returns its path."""
    writer = _start(path, "gemma3", shape, rms_eps=1e-6, rope_base=1_000_000.0)
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_sliding_window(shape.window)
    vocab = _add_tokenizer(writer)
    weight = _random_weights(seed)

    def norm(size: int) -> np.ndarray:
        return np.ones(size, dtype=np.float32)

    q, kv, emb, ffn = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.embedding, shape.feed_forward
    writer.add_tensor("token_embd.weight", weight(vocab, emb))
    writer.add_tensor("output_norm.weight", norm(emb))
    for block in range(shape.block_count):
        prefix = f"blk.{block}."
        for name, tensor in (
            ("attn_norm.weight", norm(emb)), ("attn_q.weight", weight(q, emb)), ("attn_k.weight", weight(kv, emb)),
            ("attn_v.weight", weight(kv, emb)), ("attn_q_norm.weight", norm(shape.head_dim)),
            ("attn_k_norm.weight", norm(shape.head_dim)), ("attn_output.weight", weight(emb, q)),
            ("post_attention_norm.weight", norm(emb)), ("ffn_norm.weight", norm(emb)),
            ("ffn_gate.weight", weight(ffn, emb)), ("ffn_up.weight", weight(ffn, emb)),
            ("ffn_down.weight", weight(emb, ffn)), ("post_ffw_norm.weight", norm(emb)),
        ):  # fmt: skip
            writer.add_tensor(prefix + name, tensor)
    return _write(writer, path)


@dataclass(frozen=True)
class LlamaShape:
    """A plain grouped-query-attention model (llama): every layer keeps the whole context, no sliding window."""

    block_count: int
    embedding: int
    heads: int
    kv_heads: int
    feed_forward: int
    context_length: int = 131072

    @property
    def head_dim(self) -> int:
        return self.embedding // self.heads

    @property
    def architecture(self) -> KvArchitecture:
        return KvArchitecture("llama", self.block_count, self.kv_heads, self.head_dim, self.head_dim, None,
                              tuple(range(self.block_count)), self.context_length)  # fmt: skip


def write_llama_gguf(path: Path, shape: LlamaShape, *, seed: int = 0) -> Path:
    """Write a llama-architecture GGUF of this shape with random F16 weights (the 270M's tokenizer); returns it."""
    writer = _start(path, "llama", shape, rms_eps=1e-5, rope_base=500_000.0)
    writer.add_rope_dimension_count(shape.head_dim)
    vocab = _add_tokenizer(writer)
    weight = _random_weights(seed)

    emb, ffn, kv = shape.embedding, shape.feed_forward, shape.kv_heads * shape.head_dim
    writer.add_tensor("token_embd.weight", weight(vocab, emb))
    writer.add_tensor("output_norm.weight", np.ones(emb, dtype=np.float32))
    for block in range(shape.block_count):
        prefix = f"blk.{block}."
        for name, tensor in (
            ("attn_norm.weight", np.ones(emb, dtype=np.float32)), ("attn_q.weight", weight(emb, emb)),
            ("attn_k.weight", weight(kv, emb)), ("attn_v.weight", weight(kv, emb)),
            ("attn_output.weight", weight(emb, emb)), ("ffn_norm.weight", np.ones(emb, dtype=np.float32)),
            ("ffn_gate.weight", weight(ffn, emb)), ("ffn_up.weight", weight(ffn, emb)),
            ("ffn_down.weight", weight(emb, ffn)),
        ):  # fmt: skip
            writer.add_tensor(prefix + name, tensor)
    return _write(writer, path)
