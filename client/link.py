"""What every runtime adapter (vLLM connector, SGLang HiCache backend, HF prefix cache) shares:

* :class:`Backoff` — the one policy for staying off a failing daemon: the first wait, doubled
  per consecutive failure up to a cap, reset by a success. A stalled daemon then costs the
  engine one timeout per wait, not one per request.
* :class:`FallbackReports` — the recompute fallbacks the adapter owes the daemon (its
  ``recompute_fallbacks`` counters), kept while the daemon is away and sent once it answers.
* :class:`DaemonLink` — one KVClient + Namespace, connected lazily (vLLM, SGLang). Any error
  closes the client; a later use reconnects from scratch (a fresh gRPC channel, so gRPC's own
  backoff never delays it) once the Backoff allows. Nothing here raises: the adapters turn "no
  namespace" into a miss.
"""
from __future__ import annotations

import logging
import threading
import time

from kvstore.client.namespace import Namespace
from kvstore.client.sdk import KVClient
from kvstore.core.layout import KVLayout


class Backoff:
    """Consecutive failures keep callers off the daemon for first_s, 2 * first_s, ... up to
    max_s; :meth:`succeeded` resets. Not thread-safe by itself: its owner holds a lock or calls
    it from one thread."""

    MAX_S = 10.0

    def __init__(self, first_s: float, max_s: float = MAX_S):
        self.first_s = first_s
        self.max_s = max(max_s, first_s)
        self._failures = 0
        self._until = 0.0

    def failed(self) -> float:
        """Record a failure; returns the wait it starts."""
        # (the exponent is capped: 2.0 ** n overflows a float after ~1000 failures)
        wait_s = min(self.first_s * 2.0 ** min(self._failures, 32), self.max_s)
        self._failures += 1
        self._until = time.monotonic() + wait_s
        return wait_s

    def succeeded(self) -> None:
        self._failures = 0
        self._until = 0.0

    def waiting(self) -> bool:
        """True while the wait the last failure started runs."""
        return time.monotonic() < self._until


class FallbackReports:
    """Recompute fallbacks not yet told to the daemon (its ``recompute_fallbacks`` counters).

    ``record`` only counts (it runs on the engine's thread, often while the daemon is away);
    ``flush`` is called by its owner right after the daemon answered (a reconnect, a served
    request) and sends everything pending in one ReportFallbacks, on a thread of its own so
    the engine never waits on it. A report that fails stays pending for the next flush, so
    fallbacks made while the daemon was down reach the daemon once it is back."""

    def __init__(self, reason: str = "unavailable"):
        self.reason = reason
        self._lock = threading.Lock()
        self._count = 0
        self._blocks = 0
        self._sending = False

    def record(self, blocks: int) -> None:
        with self._lock:
            self._count += 1
            self._blocks += max(0, int(blocks))

    def pending(self) -> tuple[int, int]:
        with self._lock:
            return self._count, self._blocks

    def flush(self, client: KVClient, namespace_id: bytes) -> None:
        with self._lock:
            if self._sending or not self._count:
                return
            # (one report may claim at most 2**20 fallbacks: the daemon refuses more)
            count, blocks = min(self._count, 1 << 20), min(self._blocks, 1 << 40)
            self._count = self._blocks = 0
            self._sending = True
        threading.Thread(target=self._send, args=(client, namespace_id, count, blocks),
                         name="kvstore-fallback-report", daemon=True).start()

    def _send(self, client: KVClient, namespace_id: bytes, count: int, blocks: int) -> None:
        ok = False
        try:
            ok = client.report_fallbacks(count, blocks, self.reason, namespace_id)
        finally:
            with self._lock:
                self._sending = False
                if not ok:
                    self._count += count
                    self._blocks += blocks


class DaemonLink:
    """cfg keys: socket, address, tenant, io_timeout_s, retry_s. ``what`` names the adapter in
    its log lines; ``log`` is the adapter's logger (so the engine's handlers show them)."""

    def __init__(self, cfg: dict, model_id: str, layout: KVLayout, name: str,
                 log: logging.Logger | None = None, what: str = "kvstore connector"):
        self.cfg = cfg
        self.model_id = model_id
        self.layout = layout
        self.name = name
        self.timeout_s = cfg["io_timeout_s"]
        self._log = log or logging.getLogger("kvstore.client")
        self._what = what
        self._lock = threading.Lock()
        self._client: KVClient | None = None
        self._ns: Namespace | None = None
        self.backoff = Backoff(cfg["retry_s"])
        self.fallbacks = FallbackReports()

    def fallback(self, blocks: int) -> None:
        """The adapter recomputed ``blocks`` instead of loading them: reported to the daemon
        with the next namespace() that finds it answering."""
        self.fallbacks.record(blocks)

    def namespace(self, timeout_s: float | None = None) -> Namespace | None:
        ns = self._namespace(timeout_s)
        if ns is not None and self.fallbacks.pending()[0]:
            self.fallbacks.flush(ns.client, ns.namespace_id)
        return ns

    def _namespace(self, timeout_s: float | None) -> Namespace | None:
        with self._lock:
            if self._ns is not None:
                return self._ns
            if self.backoff.waiting():
                return None
            try:
                self._client = KVClient(self.cfg["socket"], address=self.cfg["address"],
                                        timeout_s=timeout_s or self.timeout_s,
                                        client_name=self.name)
                self._ns = self._client.namespace(self.model_id, self.layout, self.cfg["tenant"])
                self.backoff.succeeded()
                self._log.info("%s %s: connected to %s (%s)", self._what, self.name,
                               self._client.target, self.layout.describe())
            except Exception as exc:  # noqa: BLE001 - the cache never fails inference
                self._drop(exc)
            return self._ns

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            self._drop(exc)

    def _drop(self, exc: BaseException) -> None:
        wait_s = self.backoff.failed()
        self._log.warning("%s %s: daemon unavailable (%s); recomputing for %.1fs", self._what,
                          self.name, exc, wait_s)
        client, self._client, self._ns = self._client, None, None
        if client is not None:
            # close() waits for in-flight I/O: never on the engine's thread.
            threading.Thread(target=client.close, daemon=True).start()

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
            self._client, self._ns = None, None
