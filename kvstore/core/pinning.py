"""Pinning a large host mapping for DMA without stalling whoever asked: chunk by chunk, on a
thread of its own, while copies of what is not pinned yet take the pageable path.

Why: ``cudaHostRegister`` of a whole arena runs at a few GB/s of page locking, so tens of GiB
take seconds, and torch's binding of it holds the interpreter lock for the whole call. Done at
once it held a daemon's start-up before it listened, and an engine's thread when the SDK first
connected. Here each call covers ``chunk_bytes`` (a few ms), the thread yields between chunks,
and the mapping is usable at once: a copy is correct whether its host memory is pinned or not
(a pageable one is staged by the driver, synchronously), only slower.

Contract:
- ``ChunkedRegistration(base, size, register, unregister, chunk_bytes)`` starts registering
  [base, base + size) in order, ``chunk_bytes`` per call of ``register(ptr, nbytes) -> error``
  (0: success). The first error stops it (logged once); what was registered stays registered.
- ``pinned_bytes``: how much of the front is registered now (it only grows until close).
  ``is_pinned(offset, nbytes)`` says whether that range lies in it.
- ``pieces(offset, nbytes)``: the range cut at registration boundaries (copy each piece
  alone: a copy spanning two registrations would be treated as pageable).
- ``close()``: stops the thread (after the call under way), waits for it and unregisters every
  chunk it registered, last first. Idempotent.

Device-free by construction: the runtime's calls are handed in (client/cuda.py and
kvstore/tiers/hbm.py pass torch's cudart bindings), so tests drive it with their own.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("kvstore.core.pinning")

DEFAULT_CHUNK_BYTES = 64 << 20
_YIELD_S = 0.001          # between two calls: the interpreter lock goes to the other threads


class ChunkedRegistration:
    def __init__(self, base: int, size_bytes: int, register: Callable[[int, int], int],
                 unregister: Callable[[int], int], chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 name: str = "kvstore-pin", what: str = "memory"):
        if chunk_bytes <= 0 or size_bytes < 0:
            raise ValueError(f"chunk_bytes must be > 0 and size_bytes >= 0, got {chunk_bytes}, "
                             f"{size_bytes}")
        self.base = base
        self.size_bytes = size_bytes
        self.chunk_bytes = chunk_bytes
        self._register = register
        self._unregister = unregister
        self._what = what
        self._lock = threading.Lock()
        self._registered: list[int] = []      # pointers registered, in order (guarded)
        self._pinned = 0                      # bytes of the front registered (guarded)
        self.error: int | None = None         # the runtime's error that stopped it, if any
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- state -----------------------------------------------------------------------------------
    @property
    def pinned_bytes(self) -> int:
        return self._pinned

    @property
    def done(self) -> bool:
        """Every byte registered, or the registration stopped (an error, close)."""
        return not self._thread.is_alive()

    def is_pinned(self, offset: int, nbytes: int) -> bool:
        return offset >= 0 and offset + nbytes <= self._pinned

    def pieces(self, offset: int, nbytes: int) -> list[tuple[int, int]]:
        """[offset, offset + nbytes) as (offset, length) pieces, none crossing a boundary
        between two registrations."""
        out = []
        end = offset + nbytes
        while offset < end:
            stop = min(end, (offset // self.chunk_bytes + 1) * self.chunk_bytes)
            out.append((offset, stop - offset))
            offset = stop
        return out

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait until done (tests, shutdown); False on timeout."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    # -- the registering thread ------------------------------------------------------------------
    def _run(self) -> None:
        off = 0
        while off < self.size_bytes and not self._stop.is_set():
            n = min(self.chunk_bytes, self.size_bytes - off)
            try:
                err = int(self._register(self.base + off, n))
            except Exception as exc:  # noqa: BLE001 - a runtime that raises stops it, as an error
                log.warning("pinning %s stopped at %d of %d bytes: %s", self._what, off,
                            self.size_bytes, exc)
                self.error = -1
                return
            if err != 0:
                self.error = err
                log.warning("pinning %s stopped at %d of %d bytes (error %s): the rest is "
                            "copied through pageable memory", self._what, off, self.size_bytes,
                            err)
                return
            with self._lock:
                self._registered.append(self.base + off)
                off += n
                self._pinned = off
            time.sleep(_YIELD_S)
        if off >= self.size_bytes:
            log.info("pinned %s (%d bytes) for DMA in %.2f s", self._what, self.size_bytes,
                     time.monotonic() - self._started)

    # -- shutdown --------------------------------------------------------------------------------
    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        with self._lock:
            regs, self._registered = self._registered, []
            self._pinned = 0
        for ptr in reversed(regs):
            try:
                self._unregister(ptr)
            except Exception as exc:  # noqa: BLE001 - shutdown goes on
                log.warning("unpinning %s failed: %s", self._what, exc)
