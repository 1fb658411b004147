"""Quantize-on-offload: int8 or fp8 (e4m3) block payloads with one scale per (block, layer, k|v).

Symmetric, round-to-nearest quantization. For each block b, layer l and half c (K or V)::

    amax  = max |x| over the block's 2-D slab [block_tokens, kv_heads, head_dim]
    scale = amax / QMAX            (float32; 0 for an all-zero slab)
    q     = quant(clamp(x * (QMAX / amax), -QMAX, QMAX))
    x'    = q * scale              (dequantize, then cast to the cache dtype)

K and V get separate scales because their ranges differ by orders of magnitude in real models;
the scales cost 8 bytes per block per layer, nothing beside the payload.

Error bound (per element, before the final cast to the cache dtype, see :func:`error_bound`):

* int8 (QMAX=127, round half away from zero): ``|x - x'| <= scale / 2`` = amax / 254.
* fp8 e4m3 (QMAX=448, 3 mantissa bits, round to nearest even): ``|x - x'| <= max(|x| / 16,
  scale * 2**-10)``: relative 2**-4 for normal values, half the subnormal step (2**-9 in
  scaled units) below 2**-6.

The final cast to a 16-bit cache dtype adds at most half an ulp of |x'| (2**-8 relative for
bfloat16, 2**-11 for float16; half a subnormal step below the smallest normal). Non-finite inputs are not supported: their slab's scale becomes
inf/nan and the slab dequantizes to nan (never silently to plausible numbers).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

QMAX = {"int8": 127.0, "float8_e4m3fn": 448.0}


def qdtype(name: str) -> torch.dtype:
    """The torch dtype of a quantized payload; raises ValueError for unsupported names."""
    if name not in QMAX:
        raise ValueError(f"quantized dtype must be one of {sorted(QMAX)}, got {name!r}")
    dt = getattr(torch, name, None)
    if dt is None:
        raise ValueError(f"this torch ({torch.__version__}) has no {name}")
    return dt


@dataclass(frozen=True)
class QuantizedBlocks:
    """``data``: [n, L, 2, B, H, D] int8/fp8; ``scales``: [n, L, 2] float32 (see module doc)."""

    data: torch.Tensor
    scales: torch.Tensor

    @property
    def qdtype(self) -> str:
        return str(self.data.dtype).removeprefix("torch.")

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scales.numel() * 4


def error_bound(x: torch.Tensor, scales: torch.Tensor, name: str,
                out_dtype: torch.dtype) -> torch.Tensor:
    """The documented per-element bound on |x - dequantize(quantize(x))| for blocks ``x``.

    ``x``: [n, L, 2, B, H, D] (any float dtype), ``scales``: [n, L, 2]. Returns float64 bounds
    of x's shape. Includes a small slack for float32 arithmetic in the scaling itself.
    """
    xs = x.double().abs()
    s = scales.double()[..., None, None, None]
    if name == "int8":
        b = s / 2
    else:
        b = torch.maximum(xs / 16, s * 2.0 ** -10)
    b = b + xs * 2.0 ** -22 + s * 2.0 ** -20          # fp32 rounding of x * (QMAX / amax)
    fi = torch.finfo(out_dtype)      # the final cast: half an ulp, subnormal ulps included
    return b + (xs + b) * (fi.eps / 2) + fi.tiny * fi.eps / 2
