"""Chunked pinning (kvstore/core/pinning.py) against a stand-in for the CUDA runtime: the
registration runs on its own thread, in order, chunk by chunk; errors stop it; close undoes
exactly what it did. The real runtime is exercised by the ``gpu`` tests."""
from __future__ import annotations

import threading

import pytest

from kvstore.core.pinning import ChunkedRegistration

MiB = 1 << 20


class Runtime:
    """cudaHostRegister / cudaHostUnregister as a recording stand-in; ``gate`` holds each
    register call until the test lets it through; ``fail_at``: the call that returns an error."""

    def __init__(self, fail_at: int | None = None, gated: bool = False):
        self.registered: list[tuple[int, int]] = []
        self.unregistered: list[int] = []
        self.threads: set[str] = set()
        self.fail_at = fail_at
        self.gate = threading.Semaphore(0) if gated else None
        self.calls = 0

    def register(self, ptr: int, n: int) -> int:
        self.threads.add(threading.current_thread().name)
        if self.gate is not None:
            assert self.gate.acquire(timeout=10), "the test never let the call through"
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            return 2                                   # cudaErrorMemoryAllocation
        self.registered.append((ptr, n))
        return 0

    def unregister(self, ptr: int) -> int:
        self.unregistered.append(ptr)
        return 0


def test_the_caller_returns_at_once_and_chunks_register_in_order_on_another_thread():
    rt = Runtime(gated=True)
    reg = ChunkedRegistration(0x10000, 10 * MiB, rt.register, rt.unregister, chunk_bytes=4 * MiB)
    # Every register call is held: the constructor returned anyway (nothing registered yet).
    assert reg.pinned_bytes == 0 and not reg.done and not reg.is_pinned(0, 1)
    for _ in range(3):
        rt.gate.release()
    assert reg.wait(10)
    assert rt.registered == [(0x10000, 4 * MiB), (0x10000 + 4 * MiB, 4 * MiB),
                             (0x10000 + 8 * MiB, 2 * MiB)]
    assert rt.threads == {"kvstore-pin"} and threading.current_thread().name not in rt.threads
    assert reg.pinned_bytes == 10 * MiB and reg.error is None
    assert reg.is_pinned(0, 10 * MiB) and not reg.is_pinned(9 * MiB, 2 * MiB)
    reg.close()
    assert rt.unregistered == [0x10000 + 8 * MiB, 0x10000 + 4 * MiB, 0x10000]
    assert reg.pinned_bytes == 0
    reg.close()                                        # idempotent
    assert len(rt.unregistered) == 3


def test_pinned_bytes_grow_chunk_by_chunk():
    rt = Runtime(gated=True)
    reg = ChunkedRegistration(0, 12 * MiB, rt.register, rt.unregister, chunk_bytes=4 * MiB)
    try:
        seen = []
        for _ in range(3):
            rt.gate.release()
            for _ in range(1000):
                if reg.pinned_bytes > (seen[-1] if seen else 0):
                    break
                threading.Event().wait(0.005)
            seen.append(reg.pinned_bytes)
        assert seen == [4 * MiB, 8 * MiB, 12 * MiB]
        assert reg.is_pinned(4 * MiB, 8 * MiB) and not reg.is_pinned(-1, 2)
    finally:
        reg.close()


def test_an_error_stops_the_registration_and_close_undoes_what_was_done():
    rt = Runtime(fail_at=3)
    reg = ChunkedRegistration(0, 20 * MiB, rt.register, rt.unregister, chunk_bytes=4 * MiB)
    assert reg.wait(10)
    assert reg.error == 2 and reg.pinned_bytes == 8 * MiB and len(rt.registered) == 2
    assert reg.is_pinned(0, 8 * MiB) and not reg.is_pinned(0, 8 * MiB + 1)
    reg.close()
    assert rt.unregistered == [4 * MiB, 0]


def test_a_runtime_that_raises_stops_it_like_an_error():
    def boom(ptr, n):
        raise RuntimeError("driver gone")
    reg = ChunkedRegistration(0, 8 * MiB, boom, lambda p: 0, chunk_bytes=4 * MiB)
    assert reg.wait(10)
    assert reg.error == -1 and reg.pinned_bytes == 0
    reg.close()


def test_close_while_registering_stops_after_the_call_under_way():
    rt = Runtime(gated=True)
    reg = ChunkedRegistration(0, 64 * MiB, rt.register, rt.unregister, chunk_bytes=4 * MiB)
    rt.gate.release()
    rt.gate.release()
    closer = threading.Thread(target=reg.close)
    for _ in range(1000):                              # two chunks in, the third call waiting
        if reg.pinned_bytes == 8 * MiB and rt.calls == 2:
            break
        threading.Event().wait(0.005)
    closer.start()
    rt.gate.release()                                  # the call under way finishes
    closer.join(10)
    assert not closer.is_alive()
    assert len(rt.registered) == 3                     # and nothing after it
    assert sorted(rt.unregistered) == sorted(p for p, _ in rt.registered)


def test_pieces_never_cross_a_registration_boundary():
    reg = ChunkedRegistration(0, 0, lambda p, n: 0, lambda p: 0, chunk_bytes=4 * MiB)
    assert reg.wait(10)
    assert reg.pieces(MiB, 2 * MiB) == [(MiB, 2 * MiB)]
    assert reg.pieces(3 * MiB, 2 * MiB) == [(3 * MiB, MiB), (4 * MiB, MiB)]
    assert reg.pieces(3 * MiB, 10 * MiB) == [(3 * MiB, MiB), (4 * MiB, 4 * MiB),
                                             (8 * MiB, 4 * MiB), (12 * MiB, MiB)]
    assert reg.pieces(4 * MiB, 4 * MiB) == [(4 * MiB, 4 * MiB)]
    assert reg.pieces(5, 0) == []
    with pytest.raises(ValueError, match="chunk_bytes"):
        ChunkedRegistration(0, 1, lambda p, n: 0, lambda p: 0, chunk_bytes=0)
