"""The metrics port: a tiny read-only HTTP server on the daemon's event loop.

    GET /metrics     Prometheus exposition (kvstore_* metrics)
    GET /api/stats   the same snapshot as JSON (what `kvstore stats --json` prints)
    GET /api/history the daemon's recent samples (kvstore.metrics.history), oldest first;
                     ?after=T: only those taken after Unix time T
    GET /            a dashboard: charts with time and unit axes of the history (per tier:
                     occupancy, hit rate, bandwidth, get latency, evictions/promotions/
                     demotions; daemon-wide: lookup latency, prefetch outcomes, errors); with
                     --remote, a REMOTE panel (the cluster tier's stats row: hits, misses,
                     bytes, queue depth, circuit state, errors; hit rate, bandwidth, queue)

Every answer is rendered from one Metrics.snapshot() or from its history; nothing here can
change the daemon. Bind it to localhost (the default) unless a scraper on another host needs it:
it shows model ids and tenant names.
"""
from __future__ import annotations

import asyncio
import json
import logging
from importlib import resources
from typing import Callable
from urllib.parse import parse_qs

from kvstore.metrics.prometheus import CONTENT_TYPE, prometheus_text
from kvstore.metrics.table import stats_to_dict
from kvstore.v1 import kvstore_pb2 as pb

log = logging.getLogger("kvstore.metrics.model")

_READ_TIMEOUT_S = 5.0
_MAX_HEADER_BYTES = 16 << 10
_MAX_CONNECTIONS = 64      # slow or idle clients cannot pile up: more are closed at once


class MetricsServer:
    def __init__(self, snapshot: Callable[[], pb.Stats], host: str, port: int,
                 history: Callable[[float], dict] | None = None):
        self.snapshot = snapshot
        self.history = history      # after_wall_s -> {"capacity", "samples"}; None: no history
        self.host = host
        self.port = port
        self._server: asyncio.base_events.Server | None = None
        self._open = 0
        self._page = resources.files("kvstore.metrics.web").joinpath("dashboard.html").read_bytes()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics and dashboard on http://%s:%d/ (/metrics for Prometheus)",
                 self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= _MAX_CONNECTIONS:
            writer.close()
            return
        self._open += 1
        try:
            await self._serve(reader, writer)
        finally:
            self._open -= 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT_S)
            status, ctype, body = self._route(head)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                ConnectionError):
            writer.close()
            return
        except Exception:
            log.exception("metrics request failed")
            status, ctype, body = "500 Internal Server Error", "text/plain", b"internal error\n"
        method = head.split(b" ", 1)[0]
        writer.write((f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                      f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
                      "X-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n").encode())
        if method != b"HEAD":
            writer.write(body)
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    def _route(self, head: bytes) -> tuple[str, str, bytes]:
        if len(head) > _MAX_HEADER_BYTES:
            return "431 Request Header Fields Too Large", "text/plain", b"headers too large\n"
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3:
            return "400 Bad Request", "text/plain", b"bad request line\n"
        method, (target, _, query) = parts[0], parts[1].partition(b"?")
        if method not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", "text/plain", b"read-only: GET or HEAD\n"
        if target == b"/metrics":
            return "200 OK", CONTENT_TYPE, prometheus_text(self.snapshot())
        if target == b"/api/stats":
            return ("200 OK", "application/json",
                    json.dumps(stats_to_dict(self.snapshot())).encode())
        if target == b"/api/history":
            try:
                after = float(parse_qs(query.decode("ascii", "replace")).get("after", ["0"])[0])
            except ValueError:
                return "400 Bad Request", "text/plain", b"after: a Unix time in seconds\n"
            body = self.history(after) if self.history else {"capacity": 0, "samples": []}
            return "200 OK", "application/json", json.dumps(body).encode()
        if target in (b"/", b"/index.html"):
            return "200 OK", "text/html; charset=utf-8", self._page
        return "404 Not Found", "text/plain", (b"not found: try /, /metrics, /api/stats "
                                                 b"or /api/history\n")
