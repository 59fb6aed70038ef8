"""Architecture prediction: the KV cache a model needs for a slot layout, from the shape of its attention.

Per attention layer that keeps the whole context: (key_length + value_length) x head_count_kv x bytes per value,
for every allocated cell. Sliding-window layers (Gemma 2/3) keep only window + micro-batch cells per slot (a
constant per slot, unless the server runs with --swa-full), so the whole cache is not slope x context: for
Gemma 3 12B at 16 slots the sliding part is twice the global part. The shape is read from a GGUF file or from
Ollama's /api/show `model_info`, which carry the same keys.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvbatch import defaults
from kvbatch.errors import UserInputError
from kvbatch.serve.config import KV_CACHE_TYPES
from kvbatch.serve.layout import SlotLayout

KIB = 1024
CELL_PAD = 256
"""llama.cpp pads the context, each slot's share and the sliding-window cache to multiples of 256 cells."""

# One global layer in every N for architectures whose files do not list the pattern (Gemma 3: 5 local, 1 global).
_SLIDING_PATTERN_BY_ARCH = {"gemma3": 6, "gemma3n": 5, "gemma2": 2}


def _pad(cells: int) -> int:
    return -(-cells // CELL_PAD) * CELL_PAD


@dataclass(frozen=True)
class KvArchitecture:
    """The shape of a model's attention that decides its KV cache size."""

    architecture: str
    block_count: int
    head_count_kv: int
    key_length: int
    value_length: int
    sliding_window: int | None
    global_layers: tuple[int, ...]
    context_length_trained: int | None = None

    @property
    def sliding_layer_count(self) -> int:
        return self.block_count - len(self.global_layers)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class KvCacheTypes:
    """The KV cache's storage types (llama-server's --cache-type-k/-v) and whether sliding layers keep it all."""

    k: str = "f16"
    v: str = "f16"
    swa_full: bool = False

    def __post_init__(self) -> None:
        for kind in (self.k, self.v):
            if kind not in KV_CACHE_TYPES:
                raise UserInputError(f"unknown KV cache type {kind!r}; known: {', '.join(KV_CACHE_TYPES)}")

    @property
    def label(self) -> str:
        """How a measurement file names this configuration: `f16-f16`, `q8_0-q8_0-swafull`."""
        return f"{self.k}-{self.v}{'-swafull' if self.swa_full else ''}"


def bytes_per_cell(arch: KvArchitecture, types: KvCacheTypes) -> float:
    """One cell of one layer: K and V for every KV head, at the cache types' bytes per element."""
    key, value = KV_CACHE_TYPES[types.k], KV_CACHE_TYPES[types.v]
    return arch.head_count_kv * (arch.key_length * key + arch.value_length * value)


def kv_bytes_per_token(arch: KvArchitecture, types: KvCacheTypes = KvCacheTypes()) -> float:
    """The slope: bytes added per token of allocated context (summed over slots, since slots split the context)."""
    layers = arch.block_count if (types.swa_full or not arch.sliding_window) else len(arch.global_layers)
    return layers * bytes_per_cell(arch, types)


@dataclass(frozen=True)
class KvCacheBreakdown:
    """The whole KV cache llama.cpp allocates at load, by part, in bytes (plus the context checkpoints it keeps
    while serving, which live in host memory)."""

    global_bytes: float
    sliding_bytes: float
    checkpoint_bytes: float
    global_cells: int
    sliding_cells_per_slot: int
    slots: int

    @property
    def cache_bytes(self) -> float:
        """What the server logs as its KV buffers, and allocates at load."""
        return self.global_bytes + self.sliding_bytes


def kv_cache(
    arch: KvArchitecture,
    layout: SlotLayout,
    types: KvCacheTypes = KvCacheTypes(),
    *,
    unified: bool = False,
    ubatch_tokens: int = defaults.UBATCH_TOKENS,
    ctx_checkpoints: int = 0,
) -> KvCacheBreakdown:
    """The whole cache for `layout`, as llama.cpp sizes it (src/llama-context.cpp, llama-kv-cache-iswa.cpp).

    The context is padded to 256; without a unified cache each slot gets its own padded share and its own stream
    of sliding-window cells, `pad256(min(share, window + ubatch))`; with one, the slots share one stream of
    `pad256(min(context, window x slots + ubatch))` cells. Each context checkpoint is a copy of one slot's window
    (its `window` most recent cells, in every sliding layer).
    """
    slots = max(layout.slots, 1)
    context = _pad(layout.total_context_tokens)
    per_stream = context if unified else _pad(context // slots)
    streams = 1 if unified else slots
    global_cells = per_stream * streams
    per_cell = bytes_per_cell(arch, types)
    if not arch.sliding_window or types.swa_full:
        layers = arch.block_count if (types.swa_full or not arch.sliding_window) else len(arch.global_layers)
        return KvCacheBreakdown(layers * per_cell * global_cells, 0.0, 0.0, global_cells, 0, slots)
    window = arch.sliding_window * (slots if unified else 1) + ubatch_tokens
    swa_stream = _pad(min(per_stream, window))
    sliding = arch.sliding_layer_count * per_cell * swa_stream
    # A checkpoint copies the window's cells of one slot (measured: 7.5 MiB for the 270M, 15 layers x 512 cells).
    checkpoint = arch.sliding_layer_count * per_cell * min(_pad(context // slots), arch.sliding_window)
    return KvCacheBreakdown(
        global_bytes=len(arch.global_layers) * per_cell * global_cells,
        sliding_bytes=sliding * streams,
        checkpoint_bytes=checkpoint * ctx_checkpoints * slots,
        global_cells=global_cells,
        sliding_cells_per_slot=swa_stream if not unified else swa_stream // slots,
        slots=slots,
    )


def _global_layers(arch_name: str, block_count: int, sliding_window: int | None, pattern: Any) -> tuple[int, ...]:
    if isinstance(pattern, (list, tuple)) and len(pattern) == block_count:
        # llama.cpp writes `sliding_window_pattern` as one bool per layer: true = sliding.
        return tuple(i for i, sliding in enumerate(pattern) if not bool(sliding))
    if not sliding_window:
        return tuple(range(block_count))
    every = int(pattern) if isinstance(pattern, (int, float)) and pattern else _SLIDING_PATTERN_BY_ARCH.get(arch_name)
    if not every:
        return tuple(range(block_count))
    return tuple(i for i in range(block_count) if (i + 1) % every == 0)


def architecture_from_metadata(metadata: dict[str, Any], source: str = "metadata") -> KvArchitecture:
    """Build the architecture from GGUF-style keys (`gemma3.block_count`, ...), as in a GGUF or Ollama's model_info."""
    arch_name = str(metadata.get("general.architecture") or "")
    if not arch_name:
        raise UserInputError(f"{source}: no general.architecture key; is this a GGUF model?")

    def key(name: str, default: Any = None) -> Any:
        return metadata.get(f"{arch_name}.{name}", default)

    try:
        block_count = int(key("block_count"))
        head_count = key("attention.head_count")
        head_count_kv = key("attention.head_count_kv", head_count)
        if isinstance(head_count_kv, (list, tuple)):  # per-layer counts: take the largest (conservative)
            head_count_kv = max(head_count_kv)
        embedding = key("embedding_length")
        default_head = int(embedding) // int(head_count) if embedding and head_count else None
        key_length = int(key("attention.key_length", default_head))
        value_length = int(key("attention.value_length", key_length))
    except (TypeError, ValueError) as exc:
        raise UserInputError(f"{source}: missing or malformed attention keys for {arch_name!r} ({exc})") from exc
    window = key("attention.sliding_window")
    window = int(window) if window else None
    pattern = key("attention.sliding_window_pattern")
    trained = key("context_length")
    return KvArchitecture(
        architecture=arch_name,
        block_count=block_count,
        head_count_kv=int(head_count_kv),
        key_length=key_length,
        value_length=value_length,
        sliding_window=window,
        global_layers=_global_layers(arch_name, block_count, window, pattern),
        context_length_trained=int(trained) if trained else None,
    )


def read_gguf_metadata(path: Path, *, max_array: int = 4096) -> dict[str, Any]:
    """The metadata key/values of a GGUF file's header, without its tensors or large arrays (token lists).

    gguf's GGUFReader parses the whole file first, which takes 16.5 s on the 253 MB Gemma 3 270M file here
    (262,144 token strings); this reads only the header, in well under a second. Arrays longer than
    `max_array` are skipped.
    """
    import struct

    from gguf.constants import GGUFValueType as T

    formats = {
        T.UINT8: "<B",
        T.INT8: "<b",
        T.UINT16: "<H",
        T.INT16: "<h",
        T.UINT32: "<I",
        T.INT32: "<i",
        T.FLOAT32: "<f",
        T.BOOL: "<?",
        T.UINT64: "<Q",
        T.INT64: "<q",
        T.FLOAT64: "<d",
    }

    def read(handle, fmt: str):
        size = struct.calcsize(fmt)
        data = handle.read(size)
        if len(data) != size:
            raise ValueError("file ends inside the header")
        return struct.unpack(fmt, data)[0]

    def read_string(handle) -> str:
        return handle.read(read(handle, "<Q")).decode("utf-8", "replace")

    def read_value(handle, kind: int):
        if kind == T.STRING:
            return read_string(handle)
        if kind == T.ARRAY:
            item_kind, count = read(handle, "<I"), read(handle, "<Q")
            if count > max_array:
                if item_kind == T.STRING:
                    for _ in range(count):
                        handle.seek(read(handle, "<Q"), 1)
                else:
                    handle.seek(struct.calcsize(formats[item_kind]) * count, 1)
                return None
            return [read_value(handle, item_kind) for _ in range(count)]
        return read(handle, formats[kind])

    metadata: dict[str, Any] = {}
    try:
        with open(path, "rb") as handle:
            if handle.read(4) != b"GGUF":
                raise ValueError("not a GGUF file (bad magic)")
            version = read(handle, "<I")
            if version < 2:
                raise ValueError(f"GGUF version {version} is too old")
            read(handle, "<Q")  # tensor count
            for _ in range(read(handle, "<Q")):
                key = read_string(handle)
                value = read_value(handle, read(handle, "<I"))
                if value is not None:
                    metadata[key] = value
    except (OSError, ValueError, KeyError, struct.error) as exc:
        raise UserInputError(f"{path}: cannot read as GGUF ({exc})") from exc
    return metadata


def architecture_from_gguf(path: Path) -> KvArchitecture:
    return architecture_from_metadata(read_gguf_metadata(Path(path)), source=str(path))


# Well-known shapes, for planning when neither a file nor a server is at hand, and for tests.
GEMMA3_270M = KvArchitecture("gemma3", 18, 1, 256, 256, 512, (5, 11, 17), 32768)
GEMMA3_12B = KvArchitecture("gemma3", 48, 8, 256, 256, 1024, tuple(range(5, 48, 6)), 131072)
