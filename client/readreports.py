"""Reports of lease-free reads: what the daemon must still learn, sent off the get's path.

A same-host get that read DRAM blocks straight from the arena (Namespace.get, proven by slot
generations) made no Acquire, so the daemon did not see it: not the blocks' LRU stamps, not
their hit counts (the selective SSD and remote write policies read them), not the DRAM tier's
get counters and latency. :class:`ReadReports` tells it afterwards with ReportReads calls that
no get waits for, made by a thread of their own: reads are queued per namespace, and while one
call is in flight the next reads pile up and go in the call after it (one call in flight per
client; a burst of gets costs a few calls, not one each). Between calls the thread lingers
LINGER_S for more reads unless someone waits for them (``flush``): a client looping on small
gets otherwise kept one ReportReads in flight all the time, whose CPU (its own thread and the
daemon's) its gets then paid for on a small host.

Ordering: the daemon learns of a read a little after it happened. Calls of this client whose
answer depends on what it read — a put's Allocate (its eviction picks by LRU stamps), Prefetch
and CancelPrefetch (a read ends the prefetches waiting for it) and ``stats()`` — first wait for
the reports queued before them (``flush``), and so does ``Delete`` (a report that reached
the daemon after the delete of its blocks would find nothing left to account), so a client
sees its own reads accounted as if they had been Acquires. Lookups answered from the index
snapshot ride along as a count, so the daemon's lookup counter includes them. A lost report (daemon restarted, namespace
unknown) is dropped with a debug line: it only ever affected eviction order and statistics.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from kvstore.core.keys import KEY_BYTES
from kvstore.v1 import kvstore_pb2 as pb

log = logging.getLogger("kvstore.client")

LINGER_S = 0.005     # how long reads may wait for company before they are reported


class _Queued:
    __slots__ = ("keys", "misses", "get_s", "lookups")

    def __init__(self):
        self.keys: list[bytes] = []      # key blobs, each a multiple of KEY_BYTES
        self.misses = 0
        self.get_s: list[float] = []
        self.lookups = 0                 # lookups answered from the index snapshot


class ReadReports:
    """The client's queue of lease-free reads and the thread that reports them:
    ``call(request)`` makes one ReportReads call (blocking; raises on failure);
    ``max_keys()``: keys one call may carry. The get's own thread only queues (a dict
    update under a lock): starting a gRPC call costs more than a small get's copy."""

    def __init__(self, call: Callable, max_keys: Callable[[], int]):
        self._call = call
        self._max_keys = max_keys
        self._cond = threading.Condition()
        self._queued: dict[bytes, _Queued] = {}
        self._busy = False          # a call is in flight
        self._sent = 0              # calls started so far, for flush
        self._done = 0              # calls finished so far
        self._closed = False
        self._flushing = 0          # callers waiting in flush: report at once, no linger
        self._thread: threading.Thread | None = None
        self.reported = 0           # blocks the daemon counted (its answers)

    def add(self, namespace_id: bytes, keys_blob: bytes, misses: int, get_s: float,
            lookups: int = 0) -> None:
        """Queue one get's lease-free reads (its proven blocks' keys, its misses, its time),
        or ``lookups`` answered from the index snapshot (the daemon counts them as Lookup
        calls: the operator's lookup count includes those that made no RPC)."""
        if not keys_blob and not misses and not lookups:
            return
        with self._cond:
            if self._closed:
                return
            was_empty = not self._queued
            q = self._queued.get(namespace_id)
            if q is None:
                q = self._queued[namespace_id] = _Queued()
            if keys_blob:
                q.keys.append(keys_blob)
                q.get_s.append(get_s)
            q.misses += misses
            q.lookups += lookups
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kvstore-reports",
                                                daemon=True)
                self._thread.start()
            # Only an empty queue has the reporter waiting for work: waking it on every read
            # (it lingers, or is in a call) cost a snapshot lookup more than the lookup itself.
            if was_empty:
                self._cond.notify_all()

    def flush(self, timeout_s: float) -> bool:
        """Wait (at most timeout_s) until every read queued before this call was sent and
        answered. False on timeout."""
        with self._cond:
            if not self._busy and not self._queued:
                return True
            # Calls run one at a time, in order: what is queued now goes in the next ones.
            target = self._sent + len(self._queued) + \
                sum(self._extra_calls(q) for q in self._queued.values())
            self._flushing += 1
            self._cond.notify_all()     # a lingering reporter sends now
            try:
                return self._cond.wait_for(
                    lambda: self._done >= target or (not self._busy and not self._queued),
                    timeout_s)
            finally:
                self._flushing -= 1

    def close(self, timeout_s: float) -> None:
        """Report what is queued (at most timeout_s), then stop the thread."""
        self.flush(timeout_s)
        with self._cond:
            self._closed = True
            self._queued.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=1.0)

    def _extra_calls(self, q: _Queued) -> int:
        """Calls beyond the first a queued entry needs (split by max_keys)."""
        n = sum(len(b) for b in q.keys) // KEY_BYTES
        return max(0, -(-n // max(1, self._max_keys())) - 1)

    def _take(self) -> pb.ReportReadsRequest:
        """The next call's request (under the lock, something queued)."""
        ns_id, q = next(iter(self._queued.items()))
        most = max(1, self._max_keys())
        blob = b"".join(q.keys)
        get_s = q.get_s[:most]
        if len(blob) > KEY_BYTES * most:   # the rest waits for the next call
            q.keys, blob = [blob[KEY_BYTES * most:]], blob[:KEY_BYTES * most]
            q.get_s = []
            misses = lookups = 0
        else:
            del self._queued[ns_id]
            misses, lookups = q.misses, q.lookups
        return pb.ReportReadsRequest(namespace_id=ns_id, keys=blob, misses=misses,
                                     get_s=get_s, lookups=lookups)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queued and not self._closed:
                    self._cond.wait()
                # let more reads join this call, unless a caller is waiting for them
                until = time.monotonic() + LINGER_S
                while not self._closed and not self._flushing:
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._closed:
                    return
                req = self._take()
                self._sent += 1
                self._busy = True
            counted = 0
            try:
                counted = self._call(req).counted
            except Exception as exc:    # noqa: BLE001 - a lost report: stats and order only
                log.debug("%d lease-free reads not reported: %s", len(req.keys) // KEY_BYTES, exc)
            with self._cond:
                self._done += 1
                self._busy = False
                self.reported += counted
                self._cond.notify_all()
