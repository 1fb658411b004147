"""The shape of one KV block, shared by the daemon and the SDK.

A block holds the keys and values of ``block_tokens`` consecutive tokens for every layer of one
model shard. Its bytes are laid out ``[num_layers, 2 (k, v), block_tokens, num_kv_heads,
head_dim]`` in ``dtype``: one layer's KV of a block is contiguous, so a runtime can consume a
block layer by layer while later layers are still arriving.

A *quantized* layout (``quant`` = "int8" or "float8_e4m3fn") stores the same logical block
(shape ``block_shape``, values of ``dtype``) as a one-byte payload of that shape followed by one
float32 scale per (layer, k|v): about half the bytes of bf16 in every tier (see
kvstore/kernels/quant.py for the error bound). The SDK quantizes on put and dequantizes on get.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

# Element sizes by dtype name (torch names without the "torch." prefix).
DTYPE_BYTES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}

SLOT_ALIGN_BYTES = 4096  # slots are 4 KiB aligned so the same slot size serves O_DIRECT
QUANT_FORMATS = ("int8", "float8_e4m3fn")   # payload dtypes of quantized layouts


class LayoutError(ValueError):
    """A layout field is out of range, or two layouts that must agree do not."""


@dataclass(frozen=True)
class KVLayout:
    # The sizes below are computed once per layout (cached_property stores them in the
    # instance's __dict__, past the frozen __setattr__; eq, hash and repr see the fields only):
    # the daemon and the SDK ask for them per block on every hot path.
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_tokens: int = 16
    dtype: str = "bfloat16"
    tp_rank: int = 0
    tp_size: int = 1
    quant: str = ""          # "" (blocks in dtype) or one of QUANT_FORMATS

    def __post_init__(self) -> None:
        dtype = str(self.dtype).removeprefix("torch.")
        object.__setattr__(self, "dtype", dtype)
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_tokens", "tp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise LayoutError(f"layout.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.tp_rank, int) or not 0 <= self.tp_rank < self.tp_size:
            raise LayoutError(f"layout.tp_rank must be in [0, {self.tp_size}), got {self.tp_rank!r}")
        if dtype not in DTYPE_BYTES:
            raise LayoutError(f"layout.dtype {dtype!r} is not one of {sorted(DTYPE_BYTES)}")
        if self.quant and self.quant not in QUANT_FORMATS:
            raise LayoutError(f"layout.quant {self.quant!r} is not one of {list(QUANT_FORMATS)} "
                              "(or empty: not quantized)")
        if self.quant and dtype not in ("float32", "float16", "bfloat16"):
            raise LayoutError(f"layout.quant needs a 16/32-bit float dtype, got {dtype}")
        if self.block_bytes > 1 << 30:
            raise LayoutError(f"a block of {self.block_bytes} bytes is over the 1 GiB limit")

    @cached_property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.block_tokens, self.num_kv_heads, self.head_dim)

    @cached_property
    def element_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @cached_property
    def layer_bytes(self) -> int:
        """Bytes of one layer's K and V within one block."""
        return 2 * self.block_tokens * self.num_kv_heads * self.head_dim * self.element_bytes

    @cached_property
    def payload_bytes(self) -> int:
        """Bytes of the block's values (quantized: one byte each)."""
        if self.quant:
            return self.num_layers * 2 * self.block_tokens * self.num_kv_heads * self.head_dim
        return self.num_layers * self.layer_bytes

    @cached_property
    def block_bytes(self) -> int:
        """Stored bytes of one block (quantized: payload, then [layers, 2] float32 scales)."""
        return self.payload_bytes + (self.num_layers * 2 * 4 if self.quant else 0)

    @cached_property
    def slot_bytes(self) -> int:
        return -(-self.block_bytes // SLOT_ALIGN_BYTES) * SLOT_ALIGN_BYTES

    def fingerprint(self) -> str:
        """Canonical text that enters the namespace digest: any field change changes every key."""
        return (
            f"L={self.num_layers};H={self.num_kv_heads};D={self.head_dim};B={self.block_tokens};"
            f"dtype={self.dtype};tp={self.tp_rank}/{self.tp_size}"
            + (f";quant={self.quant}" if self.quant else "")   # unquantized keys unchanged
        )

    def describe(self) -> str:
        return (
            f"{self.num_layers} layers x {self.num_kv_heads} kv heads x {self.head_dim} dims, "
            f"{self.block_tokens} tokens/block, {self.dtype}, tp {self.tp_rank}/{self.tp_size}"
            + (f", stored as {self.quant}" if self.quant else "")
        )

    def to_proto(self, pb):
        return pb.KVLayout(
            num_layers=self.num_layers, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            block_tokens=self.block_tokens, dtype=self.dtype, tp_rank=self.tp_rank,
            tp_size=self.tp_size, quant=self.quant,
        )

    @classmethod
    def from_proto(cls, msg) -> "KVLayout":
        return cls(
            num_layers=msg.num_layers, num_kv_heads=msg.num_kv_heads, head_dim=msg.head_dim,
            block_tokens=msg.block_tokens, dtype=msg.dtype, tp_rank=msg.tp_rank,
            tp_size=msg.tp_size or 1, quant=msg.quant,
        )
