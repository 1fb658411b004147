"""Block keys: the prefix hash chain (property tests)."""
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.core.keys import (KEY_BYTES, MalformedKeyError, chain_keys, namespace_digest, pack_keys,
                          unpack_keys)
from kvstore.core.layout import KVLayout, LayoutError

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_tokens=4)
SEED = namespace_digest("m", LAYOUT)
tokens = st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=64)


@given(tokens, tokens)
def test_equal_prefixes_give_equal_keys(a, b):
    ka, kb = chain_keys(SEED, a + b, 4), chain_keys(SEED, a, 4)
    assert ka[: len(kb)] == kb
    assert all(len(k) == KEY_BYTES for k in ka)
    assert len(ka) == len(a + b) // 4


@given(st.lists(st.integers(0, 2**32 - 1), min_size=8, max_size=64), st.data())
def test_changing_a_token_changes_every_later_key(toks, data):
    i = data.draw(st.integers(0, len(toks) // 4 * 4 - 1))
    changed = list(toks)
    changed[i] = (changed[i] + 1) % 2**32
    before, after = chain_keys(SEED, toks, 4), chain_keys(SEED, changed, 4)
    block = i // 4
    assert before[:block] == after[:block]
    assert all(x != y for x, y in zip(before[block:], after[block:]))


@settings(max_examples=50)
@given(st.sampled_from(["num_layers", "num_kv_heads", "head_dim", "block_tokens", "dtype",
                        "tp_rank", "tenant", "model"]))
def test_layout_tenant_or_model_change_changes_every_key(field):
    toks = list(range(32))
    kwargs = dict(num_layers=2, num_kv_heads=2, head_dim=8, block_tokens=4, tp_size=2)
    base_keys = chain_keys(namespace_digest("m", KVLayout(**kwargs), "t"), toks, 4)
    model, tenant = "m", "t"
    if field == "dtype":
        kwargs["dtype"] = "float16"
    elif field == "tp_rank":
        kwargs["tp_rank"] = 1
    elif field == "tenant":
        tenant = "other"
    elif field == "model":
        model = "m2"
    else:
        kwargs[field] = kwargs[field] * 2
    other = chain_keys(namespace_digest(model, KVLayout(**kwargs), tenant), toks,
                       kwargs["block_tokens"])
    assert not set(base_keys) & set(other)


def test_keys_are_identical_across_processes():
    code = ("from kvstore.core.keys import chain_keys, namespace_digest; from kvstore.core.layout import "
            "KVLayout; l = KVLayout(2, 2, 8, block_tokens=4); "
            "print(b''.join(chain_keys(namespace_digest('m', l), list(range(40)), 4)).hex())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={"PYTHONHASHSEED": str(seed)}).stdout
            for seed in (1, 2)}
    assert len(outs) == 1
    assert outs.pop().strip() == b"".join(chain_keys(SEED, list(range(40)), 4)).hex()


def test_partial_trailing_block_gets_no_key():
    assert len(chain_keys(SEED, list(range(7)), 4)) == 1
    assert chain_keys(SEED, [], 4) == []


def test_bad_tokens_and_keys_are_rejected():
    with pytest.raises(MalformedKeyError):
        chain_keys(SEED, [-1, 2, 3, 4], 4)
    with pytest.raises(MalformedKeyError):
        chain_keys(SEED, [2**32, 2, 3, 4], 4)
    with pytest.raises(MalformedKeyError):
        pack_keys([b"short"])
    with pytest.raises(MalformedKeyError):
        unpack_keys(b"x" * 17)
    assert unpack_keys(pack_keys([b"a" * 16, b"b" * 16])) == [b"a" * 16, b"b" * 16]


@pytest.mark.parametrize("kwargs", [dict(num_layers=0), dict(head_dim=-1), dict(dtype="int4"),
                                    dict(tp_rank=2, tp_size=2), dict(block_tokens=1.5)])
def test_bad_layouts_are_rejected(kwargs):
    base = dict(num_layers=2, num_kv_heads=2, head_dim=8, block_tokens=4)
    base.update(kwargs)
    with pytest.raises(LayoutError):
        KVLayout(**base)


def test_layout_sizes():
    l = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, block_tokens=16, dtype="bfloat16")
    assert l.block_bytes == 2 * 32 * 8 * 128 * 16 * 2 == 2 << 20
    assert l.slot_bytes == l.block_bytes
    assert KVLayout(1, 1, 8, block_tokens=1, dtype="float32").slot_bytes == 4096
