"""The remote tier's calls to its engine, and the state its read and write paths share.

Every engine call runs in a bounded thread pool under a deadline, behind the circuit breaker
(fills' reads on threads of their own, ``reader=True``: a backend may lower their CPU priority,
see kvstore.tiers.remote.mooncake):
:meth:`EngineCalls.call` answers the call's result or raises RemoteUnavailable (refused,
failed, late) — the caller degrades to local. The counters, the remote keys known stored,
and the background tasks (which close waits for) are shared by the fill path
(kvstore.tiers.remote.fills) and the write queue (kvstore.tiers.remote.writes); this object
is their one owner.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kvstore.tiers.remote.base import RemoteBackend, RemoteError
from kvstore.tiers.remote.breaker import CircuitBreaker

log = logging.getLogger("kvstore.remote")

KNOWN_KEYS = 1 << 20         # remote keys remembered as stored (skip re-queueing them)
# Fills read one at a time (their FIFO lane); a second thread lets the next fill's read start
# while a read that missed its deadline is still stuck in the engine.
READ_THREADS = 2


class RemoteUnavailable(Exception):
    """A remote call was refused, failed or missed its deadline: the caller degrades."""


@dataclass
class RemoteCounters:
    hits: int = 0                 # blocks read from the remote, verified, served
    misses: int = 0               # blocks looked for past the local prefix and not served
    bytes_in: int = 0             # block bytes written to the remote
    bytes_out: int = 0            # block bytes read from the remote
    writes: int = 0               # blocks written
    writes_deduplicated: int = 0  # blocks the remote already had (another host stored them)
    writes_skipped: int = 0       # queue full, or remote unavailable
    writes_failed: int = 0        # the engine refused the put (pool full)
    checksum_failures: int = 0    # remote values read whole that were not this block: removed
    errors: int = 0               # engine calls, and block reads within one, that failed
    timeouts: int = 0             # waits that missed their deadline
    refused: int = 0              # calls not made: circuit open or thread pool busy


class EngineCalls:
    """The engine client's calls, bounded and guarded; the tier's shared counters and keys."""

    def __init__(self, backend: RemoteBackend, url: str, threads: int,
                 breaker: CircuitBreaker | None = None):
        self.backend = backend
        self.url = url
        self.breaker = breaker or CircuitBreaker()
        self.counters = RemoteCounters()
        self.closed = False
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kvstore-remote")
        self._reader = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="kvstore-remote-read")
        self._max_inflight = threads * 2 + READ_THREADS
        self._inflight = 0
        self._background: set[asyncio.Task] = set()
        self._known: collections.OrderedDict[str, None] = collections.OrderedDict()

    async def call(self, fn, *args, deadline_s: float | None = None,
                   late: list | None = None, reader: bool = False):
        """Run ``fn`` in the pool (``reader``: on the fills' read threads); its result, or
        RemoteUnavailable (refused, failed, late). A late call keeps running; its outcome
        still feeds the breaker, and its future is appended to ``late`` (the caller learns
        when it has returned)."""
        if self.closed or self._inflight >= self._max_inflight or not self.breaker.allow():
            self.counters.refused += 1
            raise RemoteUnavailable("remote not called")
        self._inflight += 1
        fut = asyncio.wrap_future((self._reader if reader else self._pool).submit(fn, *args))
        fut.add_done_callback(self._finished)
        try:
            if deadline_s is None:
                return await asyncio.shield(fut)
            return await asyncio.wait_for(asyncio.shield(fut), deadline_s)
        except asyncio.TimeoutError:
            self.counters.timeouts += 1
            self.breaker.failure()
            if late is not None:
                late.append(fut)
            raise RemoteUnavailable(f"remote call missed its {deadline_s:g}s deadline") from None
        except RemoteError as exc:
            raise RemoteUnavailable(str(exc)) from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:      # a bug or an engine surprise: still only a miss
            raise RemoteUnavailable(repr(exc)) from None

    def _finished(self, fut: asyncio.Future) -> None:
        self._inflight -= 1
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            self.breaker.success()
            return
        self.counters.errors += 1
        before = self.breaker.state
        self.breaker.failure()
        if self.breaker.state != before:
            log.warning("remote %s: %s; circuit %s (calls resume after a probe succeeds)",
                        self.url, exc, self.breaker.state)
        elif not isinstance(exc, RemoteError):
            log.error("remote %s: unexpected %r", self.url, exc)

    # -- keys known stored in the engine --------------------------------------------------------
    def known(self, rkey: str) -> bool:
        return rkey in self._known

    def remember(self, rkey: str) -> None:
        known = self._known
        known[rkey] = None
        known.move_to_end(rkey)
        if len(known) > KNOWN_KEYS:
            known.popitem(last=False)

    def forget(self, rkey: str) -> None:
        self._known.pop(rkey, None)

    # -- background work ------------------------------------------------------------------------
    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def background(self) -> int:
        return len(self._background)

    async def wait_background(self, timeout_s: float) -> None:
        if self._background:
            await asyncio.wait(list(self._background), timeout=max(timeout_s, 0))

    def shutdown(self) -> None:
        """(any thread) Wait for the pools' calls to return; the engine client stays open."""
        self._pool.shutdown(True)
        self._reader.shutdown(True)


def ewma(prev: float, nbytes: int, seconds: float) -> float:
    if nbytes <= 0 or seconds <= 0:
        return prev
    bw = nbytes / seconds
    w = min(1.0, nbytes / (64 << 20))   # weight by bytes: a one-block batch moves it little
    return bw if not prev else (1 - w) * prev + w * bw
