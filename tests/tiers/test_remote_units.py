"""The cluster tier's pieces without an engine: value framing, the circuit breaker, URLs."""
from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstore.daemon.config import ConfigError, load_config
from kvstore.tiers.remote.base import LazyClient, RemoteError, import_engine, parse_remote_url
from kvstore.tiers.remote.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from kvstore.tiers.remote.codec import (HEADER_BYTES, KEY_PREFIX, ReadStatus, encode_header,
                                        remote_key, verify)

KEY = bytes(range(16))
NS = bytes(range(16, 32))


@given(st.binary(min_size=1, max_size=4096), st.integers(0, 4095), st.integers(1, 255))
def test_any_changed_byte_is_corrupt(data, pos, flip):
    header = encode_header(KEY, NS, data)
    assert len(header) == HEADER_BYTES
    assert verify(header, KEY, NS, data) == ReadStatus.OK
    bad = bytearray(data)
    bad[pos % len(data)] ^= flip
    assert verify(header, KEY, NS, bytes(bad)) == ReadStatus.CORRUPT
    hbad = bytearray(header)
    hbad[pos % HEADER_BYTES] ^= flip
    if pos % HEADER_BYTES < 56:       # the last 8 bytes are padding
        assert verify(bytes(hbad), KEY, NS, data) == ReadStatus.CORRUPT


def test_a_valid_value_of_another_block_or_namespace_is_corrupt():
    data = b"x" * 100
    other_key = bytes(16)
    assert verify(encode_header(other_key, NS, data), KEY, NS, data) == ReadStatus.CORRUPT
    assert verify(encode_header(KEY, other_key, data), KEY, NS, data) == ReadStatus.CORRUPT
    assert verify(encode_header(KEY, NS, data + b"y"), KEY, NS, data) == ReadStatus.CORRUPT
    assert verify(None, KEY, NS, data) == ReadStatus.MISSING
    assert verify(b"", KEY, NS, data) == ReadStatus.CORRUPT


def test_remote_keys_carry_the_format_version_and_are_stable():
    k = remote_key(NS, KEY)
    assert k.startswith(KEY_PREFIX) and k == KEY_PREFIX + NS.hex() + KEY.hex()
    assert remote_key(NS, KEY) != remote_key(KEY, NS)


def test_breaker_opens_after_failures_probes_once_and_closes_on_success():
    now = [0.0]
    b = CircuitBreaker(failures_to_open=3, cooldown_s=1.0, max_cooldown_s=4.0, clock=lambda: now[0])
    for _ in range(2):
        assert b.allow()
        b.failure()
    assert b.state == CLOSED
    b.failure()
    assert b.state == OPEN and not b.allow()
    now[0] = 1.0
    assert b.allow() and b.state == HALF_OPEN
    assert not b.allow()                 # only one probe
    b.failure()                          # the probe failed: open for twice as long
    assert b.state == OPEN
    now[0] = 2.9
    assert not b.allow()
    now[0] = 3.0
    assert b.allow()
    b.success()
    assert b.state == CLOSED and b.allow() and b.opened == 2


def test_remote_urls():
    assert str(parse_remote_url("mooncake://10.0.0.1:50051")) == "mooncake://10.0.0.1:50051"
    u = parse_remote_url("redis://a:7000,b:7001")
    assert u.scheme == "redis" and u.hosts == (("a", 7000), ("b", 7001))
    for bad in ("mooncake://a:1,b:2", "redis://a", "http://a:1", "redis://a:99999", "a:1"):
        with pytest.raises(ValueError):
            parse_remote_url(bad)


def test_remote_config_keys(tmp_path):
    cfg = load_config(env={})
    assert cfg.remote == ""         # off by default
    p = tmp_path / "kv.toml"
    p.write_text('remote = "redis://127.0.0.1:7000"\nremote_deadline_s = 0.1\n'
                 'remote_write_policy = "write-through-selective"\n')
    cfg = load_config(p, env={})
    assert (cfg.remote, cfg.remote_deadline_s, cfg.remote_write_policy) == (
        "redis://127.0.0.1:7000", 0.1, "write_through_selective")
    with pytest.raises(ConfigError, match="remote"):
        load_config(env={"KVSTORE_REMOTE": "mooncake://nohost"})
    with pytest.raises(ConfigError, match="remote_write_policy"):
        load_config(overrides={"remote_write_policy": "write_back"}, env={})
    assert (cfg.remote_read_chunk_bytes, cfg.remote_fill_on_lookup) == (256 << 20, True)
    cfg = load_config(env={"KVSTORE_REMOTE_READ_CHUNK_BYTES": "16MiB",
                           "KVSTORE_REMOTE_FILL_ON_LOOKUP": "false"})
    assert (cfg.remote_read_chunk_bytes, cfg.remote_fill_on_lookup) == (16 << 20, False)
    with pytest.raises(ConfigError, match="remote_read_chunk_bytes"):
        load_config(overrides={"remote_read_chunk_bytes": "lots"}, env={})


def test_lazy_client_connects_once_for_all_threads_and_again_after_reset():
    made, closed = [], []
    gate = threading.Event()

    def connect():
        gate.wait(5)               # every thread is inside get() before the first connect ends
        made.append(object())
        return made[-1]
    lazy = LazyClient(connect, closed.append)
    got = []
    threads = [threading.Thread(target=lambda: got.append(lazy.get())) for _ in range(8)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(5)
    assert len(made) == 1 and got == made * 8
    lazy.reset()
    assert closed == made
    second = lazy.get()
    assert second is made[1] and lazy.get() is second
    lazy.close()
    assert closed == made


def test_lazy_client_retries_a_failed_connect_and_swallows_close_errors():
    attempts = []

    def connect():
        attempts.append(1)
        if len(attempts) == 1:
            raise RemoteError("engine down")
        return "client"

    def disconnect(c):
        raise OSError("socket already gone")
    lazy = LazyClient(connect, disconnect)
    with pytest.raises(RemoteError, match="engine down"):
        lazy.get()
    assert lazy.get() == "client" and len(attempts) == 2
    lazy.reset()                   # the close error is logged, not raised
    assert lazy.get() == "client" and len(attempts) == 3


def test_a_missing_engine_client_says_how_to_install_it():
    with pytest.raises(RemoteError, match=r"pip install 'kvstore-offload\[nosuch\]' \(and more\)"):
        import_engine("kvstore_no_such_engine_module", "nosuch", " (and more)")
