"""The daemon link the runtime adapters share (vLLM connector, SGLang HiCache backend).

One KVClient + Namespace, connected lazily. Any error closes the client; a later use reconnects
from scratch (a fresh gRPC channel, so gRPC's own backoff never delays it). Consecutive failures
double the wait from retry_s up to MAX_RETRY_S: a stalled daemon costs the engine one timeout
per wait, not one per request. Nothing here raises: the adapters turn "no namespace" into a miss.
"""
from __future__ import annotations

import logging
import threading
import time

from kvstore.client.namespace import Namespace
from kvstore.client.sdk import KVClient
from kvstore.layout import KVLayout


class DaemonLink:
    """cfg keys: socket, address, tenant, io_timeout_s, retry_s. ``what`` names the adapter in
    its log lines; ``log`` is the adapter's logger (so the engine's handlers show them)."""

    MAX_RETRY_S = 10.0

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
        self._next_try = 0.0
        self._failures = 0

    def namespace(self, timeout_s: float | None = None) -> Namespace | None:
        with self._lock:
            if self._ns is not None:
                return self._ns
            if time.monotonic() < self._next_try:
                return None
            try:
                self._client = KVClient(self.cfg["socket"], address=self.cfg["address"],
                                        timeout_s=timeout_s or self.timeout_s,
                                        client_name=self.name)
                self._ns = self._client.namespace(self.model_id, self.layout, self.cfg["tenant"])
                self._failures = 0
                self._log.info("%s %s: connected to %s (%s)", self._what, self.name,
                               self._client.target, self.layout.describe())
            except Exception as exc:  # noqa: BLE001 - the cache never fails inference
                self._drop(exc)
            return self._ns

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            self._drop(exc)

    def _drop(self, exc: BaseException) -> None:
        # (the exponent is capped: 2.0 ** n overflows a float after ~1000 failures)
        wait_s = min(self.cfg["retry_s"] * 2.0 ** min(self._failures, 32), self.MAX_RETRY_S)
        self._failures += 1
        self._log.warning("%s %s: daemon unavailable (%s); recomputing for %.1fs", self._what,
                          self.name, exc, wait_s)
        client, self._client, self._ns = self._client, None, None
        self._next_try = time.monotonic() + wait_s
        if client is not None:
            # close() waits for in-flight I/O: never on the engine's thread.
            threading.Thread(target=client.close, daemon=True).start()

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
            self._client, self._ns = None, None
