"""Quantized namespaces through a real daemon: the SDK stores int8/fp8 payloads plus scales (about
half the bytes of bf16 in every tier) and gives back values within the documented bound."""
from __future__ import annotations

import pytest
import torch

from kvstore.client import FailedPrecondition, InvalidArgument, KVClient
from kvstore.kernels import error_bound
from kvstore.core.layout import KVLayout, LayoutError

from support.ssd import ssd_args, ssd_stats, tier

BASE = dict(num_layers=4, num_kv_heads=4, head_dim=64, block_tokens=16, dtype="bfloat16")


def blocks(seed: int, n: int, layout: KVLayout) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *layout.block_shape), generator=g) * 3
    x[:, :, 1] *= 0.05                       # V far smaller than K: separate scales matter
    return x.to(getattr(torch, layout.dtype))


def check_within_bound(got: torch.Tensor, want: torch.Tensor, layout: KVLayout) -> None:
    from kvstore.kernels import quantize
    q = quantize(want, layout.quant)          # the scales the put computed (deterministic)
    bound = error_bound(want, q.scales, layout.quant, want.dtype)
    err = (got.double() - want.double()).abs()
    assert got.dtype == want.dtype and got.shape == want.shape
    assert bool((err <= bound).all()), f"max excess {float((err - bound).max())}"
    assert float(err.max()) > 0                # it really was quantized


def test_layout_sizes_and_keys():
    plain = KVLayout(**BASE)
    q8 = KVLayout(**BASE, quant="int8")
    assert plain.block_bytes == 4 * 2 * 16 * 4 * 64 * 2
    assert q8.block_bytes == plain.block_bytes // 2 + 4 * 2 * 4       # payload + scales
    assert q8.fingerprint() != plain.fingerprint()
    assert plain.fingerprint().endswith("tp=0/1")                     # old keys unchanged
    with pytest.raises(LayoutError, match="quant"):
        KVLayout(**BASE, quant="int4")
    with pytest.raises(LayoutError, match="float dtype"):
        KVLayout(**{**BASE, "dtype": "uint8"}, quant="int8")


@pytest.mark.parametrize("quant", ["int8", "float8_e4m3fn"])
def test_put_get_round_trip_within_the_bound(daemon, quant):
    layout = KVLayout(**BASE, quant=quant)
    with KVClient(daemon.socket) as c:
        ns = c.namespace(f"q-{quant}", layout)
        kv = blocks(1, 6, layout)
        keys = ns.block_keys(list(range(6 * 16)))
        assert ns.put(keys, kv).result(timeout=30) == 6
        got = ns.get(keys).result(timeout=30)
        check_within_bound(got, kv, layout)
        out = torch.full((8, *layout.block_shape), 7.0, dtype=torch.bfloat16)
        got2 = ns.get(keys, out=out).result(timeout=30)
        assert torch.equal(got2, got) and got2.data_ptr() == out.data_ptr()
        assert bool((out[6:] == 7).all())                  # nothing past the found blocks
        assert ns.lookup(keys[:3] + [b"\x01" * 16]).num_cached == 3
        [st] = [n for n in c.stats().namespaces if n.model_id == f"q-{quant}"]
        assert st.bytes == 6 * layout.block_bytes          # half of bf16, plus the scales


def test_bad_inputs_are_clear_errors(daemon):
    layout = KVLayout(**BASE, quant="int8")
    with KVClient(daemon.socket) as c:
        ns = c.namespace("q-bad", layout)
        keys = ns.block_keys(list(range(32)))
        with pytest.raises(InvalidArgument, match="torch tensors"):
            ns.put(keys, blocks(2, 2, layout).float().numpy())
        with pytest.raises(InvalidArgument, match="layout says bfloat16"):
            ns.put(keys, blocks(2, 2, layout).float())
        with pytest.raises(InvalidArgument, match="out must hold"):
            ns.get(keys, out=torch.empty((1, *layout.block_shape), dtype=torch.bfloat16))
        # the same model unquantized is another layout: refused, never misread
        with pytest.raises(FailedPrecondition, match="layout mismatch"):
            c.namespace("q-bad", KVLayout(**BASE)).lookup(keys)


def test_quantized_blocks_survive_the_ssd_tier_and_a_restart(daemon_factory, tmp_path):
    layout = KVLayout(**BASE, quant="int8")
    ssd_dir = tmp_path / "ssd"
    d = daemon_factory(*ssd_args(ssd_dir, "32MiB"))
    with KVClient(d.socket) as c:
        ns = c.namespace("q-ssd", layout)
        kv = blocks(3, 8, layout)
        keys = ns.block_keys(list(range(8 * 16)))
        ns.put(keys, kv).result(timeout=30)
        assert tier(ssd_stats(c), "SSD").bytes_in == 8 * layout.slot_bytes
    d.kill()
    d2 = daemon_factory(*ssd_args(ssd_dir, "32MiB"), workdir=tmp_path / "after")
    with KVClient(d2.socket) as c:
        ns = c.namespace("q-ssd", layout)                  # the journal kept the quant field
        assert ns.lookup(keys).tiers == ["SSD"] * 8
        check_within_bound(ns.get(keys).result(timeout=30), kv, layout)


def test_gets_into_inference_tensors(daemon):
    """Engines allocate buffers under torch.inference_mode; the SDK writes into them from its
    own threads (where inference mode is off) — quantized or not."""
    for quant in ("", "int8"):
        layout = KVLayout(**BASE, quant=quant)
        with KVClient(daemon.socket) as c:
            ns = c.namespace(f"inf-{quant or 'plain'}", layout)
            kv = blocks(4, 3, layout)
            keys = ns.block_keys(list(range(3 * 16)))
            ns.put(keys, kv).result(timeout=30)
            with torch.inference_mode():
                out = torch.zeros((3, *layout.block_shape), dtype=torch.bfloat16)
            got = ns.get(keys, out=out).result(timeout=30)
            assert out.is_inference() and got.data_ptr() == out.data_ptr()
            if quant:
                check_within_bound(out, kv, layout)
            else:
                assert torch.equal(out, kv)
            assert not ns.get(keys).result(timeout=30).is_inference()   # a fresh result is not
