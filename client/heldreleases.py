"""Releases held back for the client's next call: a get's Release rides on the next Acquire.

A leased get (Namespace._get_leased) proves its copy by the slots' generations and needs no
answer to its Release; it used to send one anyway, without waiting. On a small host that call
cost as much CPU as the Acquire (measured: 0.55-0.65 ms of the daemon's event loop and 0.3 ms
of the client per empty call, 2-core VM): half the RPCs of an SSD-bound get stream. Now such a
release is held here and goes out with this client's next Acquire or Release of the same
session (``release_lease_ids``), which the daemon ends before it leases anything, so the slots
are back before the next get needs room. With no such call within LINGER_S, a thread of its
own sends what is held in one Release call per session.

Holding a release keeps its slots leased a little longer (at most LINGER_S plus one call):
slots the daemon cannot evict meanwhile. Only releases whose copies were proven are held
(``wait=False``); a release that confirms a lease (``wait=True``) or publishes HBM fill slots
goes at once. A held release that cannot be delivered (daemon restarted, session gone) is
dropped with a debug line: its lease ends with its session or at its expiry, and the copy was
proven all the same.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from kvstore.v1 import kvstore_pb2 as pb

log = logging.getLogger("kvstore.client")

LINGER_S = 0.005          # how long a release waits for a call to ride on
MAX_PER_CALL = 4096       # lease ids one call carries


class Held:
    """Releases taken for one call: ``fields()`` are its request's release fields."""
    __slots__ = ("session_id", "ids", "since")

    def __init__(self, session_id: int, ids: list[int], since: list[float]):
        self.session_id, self.ids, self.since = session_id, ids, since

    def fields(self) -> dict:
        if not self.ids:
            return {}
        now = time.monotonic()
        return {"release_lease_ids": self.ids,
                "release_waited_s": [max(0.0, now - t) for t in self.since]}


class HeldReleases:
    """``call(request)``: one blocking Release call (raises on failure)."""

    def __init__(self, call: Callable, linger_s: float = LINGER_S):
        self._call = call
        self.linger_s = linger_s
        self._cond = threading.Condition()
        self._held: dict[int, tuple[list[int], list[float]]] = {}   # session -> (ids, since)
        self._busy = False
        self._flushing = 0
        self._closed = False
        self._idle = False         # the thread waits with nothing held (a hold must wake it)
        self._thread: threading.Thread | None = None
        self.riding = 0          # releases that went out on another call
        self.sent_alone = 0      # releases the thread sent in calls of their own

    def hold(self, session_id: int, lease_id: int) -> None:
        """Hold the release of a lease whose copy was proven. After close: sent at once."""
        with self._cond:
            if self._closed:
                closed = True
            else:
                closed = False
                ids, since = self._held.setdefault(session_id, ([], []))
                ids.append(lease_id)
                since.append(time.monotonic())
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="kvstore-releases",
                                                    daemon=True)
                    self._thread.start()
                if self._idle:
                    self._cond.notify_all()
        if closed:
            self._send(pb.ReleaseRequest(session_id=session_id, lease_id=lease_id))

    def take(self, session_id: int) -> Held:
        """The releases held for ``session_id`` (at most MAX_PER_CALL), for a call about to be
        made: they are the caller's now (``give_back`` if its call fails)."""
        with self._cond:
            taken = self._take(session_id)
            self.riding += len(taken.ids)
            return taken

    def _take(self, session_id: int) -> Held:
        entry = self._held.get(session_id)
        if entry is None:
            return Held(session_id, [], [])
        ids, since = entry
        if len(ids) <= MAX_PER_CALL:
            del self._held[session_id]
            return Held(session_id, ids, since)
        taken = Held(session_id, ids[:MAX_PER_CALL], since[:MAX_PER_CALL])
        del ids[:MAX_PER_CALL], since[:MAX_PER_CALL]   # the rest goes in the next call
        return taken

    def give_back(self, held: Held) -> None:
        """The call that carried ``held`` failed: the thread sends them (a lease the daemon had
        ended already is skipped there)."""
        if not held.ids:
            return
        with self._cond:
            self.riding -= len(held.ids)
            if self._closed:
                return
            ids, since = self._held.setdefault(held.session_id, ([], []))
            ids[:0], since[:0] = held.ids, held.since
            self._cond.notify_all()

    def flush(self, timeout_s: float) -> bool:
        """Send what is held now and wait (at most timeout_s) until it was answered."""
        with self._cond:
            if not self._held and not self._busy:
                return True
            self._flushing += 1
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: not self._held and not self._busy,
                                           timeout_s)
            finally:
                self._flushing -= 1

    def close(self, timeout_s: float) -> None:
        self.flush(timeout_s)
        with self._cond:
            self._closed = True
            self._held.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=1.0)

    def _send(self, req: pb.ReleaseRequest) -> None:
        try:
            self._call(req)
        except Exception as exc:      # noqa: BLE001 - the lease ends with its session/expiry
            log.debug("%d held lease releases not delivered: %s",
                      len(req.release_lease_ids) + bool(req.lease_id), exc)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    if not self._held:
                        # idle: the next hold wakes this thread; while it waits with a timeout
                        # (something held) holds do not wake it, so a stream of gets costs it
                        # one wake-up per LINGER_S at most, not one per get
                        self._idle = True
                        self._cond.wait()
                        self._idle = False
                        continue
                    if self._flushing:
                        break
                    oldest = min(since[0] for _, since in self._held.values())
                    left = oldest + self.linger_s - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                # taken under the lock: a call of the client cannot take them meanwhile
                held = self._take(min(self._held, key=lambda s: self._held[s][1][0]))
                self.sent_alone += len(held.ids)
                self._busy = True
            self._send(pb.ReleaseRequest(session_id=held.session_id, **held.fields()))
            with self._cond:
                self._busy = False
                self._cond.notify_all()
