"""Reports of lease-free reads: what the daemon must still learn, sent off the get's path.

A same-host get that read DRAM blocks straight from the arena (Namespace.get, proven by slot
generations) made no Acquire, so the daemon did not see it: not the blocks' LRU stamps, not
their hit counts (the selective SSD and remote write policies read them), not the DRAM tier's
get counters and latency. :class:`ReadReports` tells it afterwards with ReportReads calls that
nobody waits for: reads are queued per namespace, and while one call is in flight the next
reads pile up and go in the call after it (one call in flight per client; a burst of gets
costs a few calls, not one each).

Ordering: the daemon learns of a read a little after it happened. Calls of this client whose
answer depends on what it read — a put's Allocate (its eviction picks by LRU stamps) and
``stats()`` — first wait for the reports queued before them (``flush``), so a client sees its
own reads accounted as if they had been Acquires. A lost report (daemon restarted, namespace
unknown) is dropped with a debug line: it only ever affected eviction order and statistics.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

from kvstore.v1 import kvstore_pb2 as pb

log = logging.getLogger("kvstore.client")


class _Queued:
    __slots__ = ("keys", "misses", "get_s")

    def __init__(self):
        self.keys: list[bytes] = []      # key blobs, each a multiple of 16 bytes
        self.misses = 0
        self.get_s: list[float] = []


class ReadReports:
    """The client's queue of lease-free reads; ``send(request)`` starts one ReportReads call
    and returns its future (a grpc.Future); ``max_keys()``: keys one call may carry."""

    def __init__(self, send: Callable, max_keys: Callable[[], int]):
        self._send = send
        self._max_keys = max_keys
        self._cond = threading.Condition()
        self._queued: dict[bytes, _Queued] = {}
        self._busy = False          # a call is in flight (or being started)
        self._sent = 0              # calls started so far, for flush
        self._done = 0              # calls finished so far
        self.reported = 0           # blocks the daemon counted (its answers)

    def add(self, namespace_id: bytes, keys_blob: bytes, misses: int, get_s: float) -> None:
        """Queue one get's lease-free reads (its proven blocks' keys, its misses, its time)."""
        if not keys_blob and not misses:
            return
        with self._cond:
            q = self._queued.get(namespace_id)
            if q is None:
                q = self._queued[namespace_id] = _Queued()
            if keys_blob:
                q.keys.append(keys_blob)
                q.get_s.append(get_s)
            q.misses += misses
            if self._busy:
                return
            self._busy = True
        self._pump()

    def flush(self, timeout_s: float) -> bool:
        """Wait (at most timeout_s) until every read queued before this call was sent and
        answered. False on timeout."""
        with self._cond:
            if not self._busy and not self._queued:
                return True
            # Calls run one at a time, in order: what is queued now goes in the next ones.
            target = self._sent + len(self._queued) + \
                sum(self._extra_calls(q) for q in self._queued.values())
            return self._cond.wait_for(
                lambda: self._done >= target or (not self._busy and not self._queued),
                timeout_s)

    def _extra_calls(self, q: _Queued) -> int:
        """Calls beyond the first a queued entry needs (split by max_keys)."""
        n = sum(len(b) for b in q.keys) // 16
        return max(0, -(-n // max(1, self._max_keys())) - 1)

    def _take(self) -> pb.ReportReadsRequest | None:
        """The next call's request (under the lock), or None with nothing queued."""
        if not self._queued:
            return None
        ns_id, q = next(iter(self._queued.items()))
        limit = max(1, self._max_keys()) * 16
        blob = b"".join(q.keys)
        get_s = q.get_s
        if len(blob) > limit:       # the rest waits for the next call
            q.keys, blob = [blob[limit:]], blob[:limit]
            q.get_s, get_s = [], get_s[:self._max_keys()]
            misses = 0
        else:
            del self._queued[ns_id]
            misses = q.misses
        return pb.ReportReadsRequest(namespace_id=ns_id, keys=blob, misses=misses,
                                     get_s=get_s[:self._max_keys()])

    def _pump(self) -> None:
        """Start the next call, or go idle (called with _busy set, without the lock)."""
        while True:
            with self._cond:
                req = self._take()
                if req is None:
                    self._busy = False
                    self._cond.notify_all()
                    return
                self._sent += 1
            try:
                fut = self._send(req)
            except Exception as exc:     # channel closed under us: the report is lost
                log.debug("could not report %d lease-free reads: %s", len(req.keys) // 16, exc)
                with self._cond:
                    self._done += 1
                    self._cond.notify_all()
                continue
            fut.add_done_callback(self._finished)
            return

    def _finished(self, fut) -> None:
        exc = None if fut.cancelled() else fut.exception()
        with self._cond:
            self._done += 1
            if exc is None and not fut.cancelled():
                self.reported += fut.result().counted
            self._cond.notify_all()
        if exc is not None:
            details = exc.details() if hasattr(exc, "details") else exc
            log.debug("lease-free reads not reported: %s", details)
        self._pump()
