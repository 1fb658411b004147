"""The access layer: a server interceptor in front of the KVStore servicer.

For every call, before the servicer sees it:
1. authenticate (bearer token; required over TCP, optional on the Unix socket; the health
   service is exempt so Kubernetes gRPC probes work without credentials) — before the request
   bytes are even decoded, so an unauthenticated caller learns nothing from a malformed message:
   UNAUTHENTICATED, counted in auth_failures (exactly), logged at most REFUSALS_LOGGED times per
   peer host per REFUSAL_LOG_INTERVAL_S, then one line with the count left out (a client
   hammering without a token must not fill the disk with log). An authenticated request that does
   not parse is INVALID_ARGUMENT (MALFORMED_REQUEST);
2. tenant isolation: a namespace whose tenant salt the caller may not use, and a session another
   caller opened, answer exactly like unknown ones (NOT_FOUND, same message, same early exit) —
   no existence oracle; registering a namespace under a salt the caller may not use is
   PERMISSION_DENIED;
3. shared memory only for the trusted (Principal.arena: the socket's owner, arena_tenants):
   others are not told the arena's or the HBM pool's location, get no slot offsets, and HBM
   requests from them are PERMISSION_DENIED (ARENA_NOT_TRUSTED) — they move bytes over gRPC;
4. per-client limits: outstanding puts and gets (allocations + leases) and active streams per
   client, in requests and bytes; over a limit is RESOURCE_EXHAUSTED for that client only.

After the call it times puts (allocate → commit) and gets (acquire → release) into the metrics,
and cuts statistics down to the caller's own tenant unless it is an admin (see _visible_stats).
Every refusal carries a reason (kvstore.core.errors).
"""
from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import time
from dataclasses import dataclass

import grpc

from kvstore.access.auth import LOCAL, Principal, TokenTable, bearer_token
from kvstore.access.status import abort
from kvstore.core.errors import (FailedPrecondition, InvalidArgument, NotFound,
                                 PermissionDenied, Reason, ResourceExhausted, Unauthenticated)
from kvstore.core.keys import KEY_BYTES
from kvstore.metrics.model import Metrics
from kvstore.v1 import kvstore_pb2 as pb

log = logging.getLogger("kvstore.access.interceptor")

_SERVICE = "/kvstore.v1.KVStore/"
_EXEMPT = ("/grpc.health.v1.Health/",)
REFUSAL_LOG_INTERVAL_S = 10.0
REFUSALS_LOGGED = 16           # per peer host and interval, before the rest are only counted
_MAX_REFUSING_PEERS = 4096     # bound on the peers tracked (expired windows are pruned first)
_NS_CALLS = {"Lookup", "Allocate", "Acquire", "AcquireLayers", "Delete", "Prefetch",
             "PlanRecompute", "ReportReads"}
_GETS = ("Acquire", "AcquireLayers")     # calls that lease blocks


class _RefusalLog:
    """Log refused calls, rate-limited per peer host: the first REFUSALS_LOGGED of a window of
    REFUSAL_LOG_INTERVAL_S one by one, the rest as one line with their count when the window
    ends. Runs on the event loop."""

    def __init__(self, interval_s: float = REFUSAL_LOG_INTERVAL_S,
                 burst: int = REFUSALS_LOGGED):
        self.interval_s = interval_s
        self.burst = burst
        self._windows: dict[str, list] = {}    # host -> [window start, logged, suppressed]

    @staticmethod
    def host(peer: str) -> str:
        """The peer without its port ("ipv4:10.0.0.1:5555" -> "ipv4:10.0.0.1"): a client
        reconnecting from new ports is one peer."""
        if peer.startswith(("ipv4:", "ipv6:")):
            return peer.rsplit(":", 1)[0]
        return peer or "unknown peer"

    def refused(self, peer: str, message: str) -> None:
        now, host = time.monotonic(), self.host(peer)
        w = self._windows.get(host)
        if w is None or now - w[0] >= self.interval_s:
            if len(self._windows) >= _MAX_REFUSING_PEERS:
                self._prune(now)
            w = self._windows[host] = [now, 0, 0]
        if w[1] < self.burst:
            w[1] += 1
            log.warning("refused a call from %s: %s", peer, message)
            return
        if not w[2]:
            asyncio.get_running_loop().call_later(
                max(0.0, w[0] + self.interval_s - now), self._report, host, w)
        w[2] += 1

    def _report(self, host: str, w: list) -> None:
        log.warning("refused %d more calls from %s in %gs without logging each (auth_failures "
                    "counts every one)", w[2], host, self.interval_s)
        w[2] = 0

    def _prune(self, now: float) -> None:
        for host, w in list(self._windows.items()):
            if now - w[0] >= self.interval_s and not w[2]:
                del self._windows[host]
        while len(self._windows) >= _MAX_REFUSING_PEERS:      # all live: forget the oldest
            del self._windows[next(iter(self._windows))]


@dataclass
class Limits:
    max_inflight_requests: int      # per client: outstanding puts + gets + active streams
    max_inflight_bytes: int         # per client: bytes of outstanding puts + gets


class _Client:
    """What one client has outstanding. ``sessions`` are the sessions it opened."""

    def __init__(self) -> None:
        self.sessions: set[int] = set()
        self.allocations: dict[tuple[int, int], int] = {}   # (session, allocation) -> bytes
        self.leases: dict[tuple[int, int], int] = {}        # (session, lease) -> bytes
        self.streams = 0


class AccessPolicy(grpc.aio.ServerInterceptor):
    def __init__(self, store, metrics: Metrics, tokens: TokenTable, limits: Limits,
                 socket_requires_token: bool = False):
        self.store = store
        self.metrics = metrics
        self.tokens = tokens
        self.limits = limits
        self.socket_requires_token = socket_requires_token
        self._owner: dict[int, str] = {}                   # session -> client key
        self._principal_of: dict[int, Principal] = {}      # session -> principal
        self._clients: dict[str, _Client] = collections.defaultdict(_Client)
        self._refusals = _RefusalLog()

    def replace_tokens(self, tokens: TokenTable) -> None:
        """Use ``tokens`` from the next call on (SIGHUP reload): a revoked token is refused at
        once, also by clients that opened their session with it."""
        self.tokens = tokens

    # -- the interceptor -----------------------------------------------------------------------
    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(_EXEMPT):
            return handler
        name = method[len(_SERVICE):] if method.startswith(_SERVICE) else None
        # The wrapped handlers receive the raw request bytes (no deserializer) and decode them
        # themselves, after authentication.
        decode = handler.request_deserializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, name, decode),
                response_serializer=handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, name, decode),
                response_serializer=handler.response_serializer)
        if handler.stream_stream:   # server reflection
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_bidi(handler.stream_stream, decode),
                response_serializer=handler.response_serializer)
        return handler

    @staticmethod
    async def _decode(raw: bytes, decode, name, context):
        if decode is None:
            return raw
        try:
            return decode(raw)
        except Exception as exc:    # protobuf's DecodeError, or anything a parser raises
            await abort(context, InvalidArgument(
                f"{name or 'request'}: the request does not parse as its message "
                f"({type(exc).__name__}); is the client built from another kvstore.proto?",
                Reason.MALFORMED_REQUEST))

    def _wrap_unary(self, inner, name, decode):
        async def behavior(raw, context):
            principal = await self._authenticate(context)
            request = await self._decode(raw, decode, name, context)
            if name:
                await self._check(name, request, principal, context)
            t0 = self.metrics.clock()
            response = inner(request, context)
            if inspect.isawaitable(response):
                response = await response
            if name and response is not None:
                response = self._after(name, request, response, principal, t0)
            return response
        return behavior

    def _wrap_stream(self, inner, name, decode):
        async def behavior(raw, context):
            principal = await self._authenticate(context)
            request = await self._decode(raw, decode, name, context)
            if name:
                await self._check(name, request, principal, context)
            key = self._client_key(principal, getattr(request, "session_id", 0))
            client = self._clients[key]
            t0 = self.metrics.clock()
            counted = name == "ReadBlocks"
            if counted:
                await self._admit(client, key, 0, context)
                client.streams += 1
            opened = None
            try:
                async for msg in inner(request, context):
                    if name == "AcquireLayers" and msg.HasField("lease"):
                        self._after("Acquire", request, msg.lease, principal, t0)
                    if name == "OpenSession" and opened is None:
                        opened = msg.session_id
                        self._session_opened(opened, principal)
                        if not principal.arena:
                            # Where the arena and the HBM pool are is withheld: such a client
                            # streams bytes over gRPC.
                            msg.ClearField("arena")
                            msg.ClearField("hbm")
                    elif name in ("GetStats", "WatchStats"):
                        msg = self._visible_stats(msg, principal)
                    yield msg
            finally:
                if counted:
                    client.streams -= 1
                if opened is not None:
                    self._session_closed(opened)
        return behavior

    def _wrap_bidi(self, inner, decode):
        async def behavior(request_iterator, context):
            await self._authenticate(context)

            async def requests():
                async for raw in request_iterator:
                    yield await self._decode(raw, decode, None, context)
            async for msg in inner(requests(), context):
                yield msg
        return behavior

    # -- authentication ----------------------------------------------------------------------
    async def _authenticate(self, context) -> Principal:
        token = bearer_token(context.invocation_metadata())
        local = (context.peer() or "").startswith("unix:")
        if token is None:
            if local and not self.socket_requires_token:
                return LOCAL
            return await self._deny(context, "missing bearer token (metadata 'authorization: "
                                    "Bearer <token>'); this listener requires one")
        principal = self.tokens.principal(token)
        if principal is None:
            return await self._deny(context, "invalid bearer token")
        return principal

    async def _deny(self, context, message: str):
        self.metrics.auth_failures += 1
        self._refusals.refused(context.peer() or "", message)
        await abort(context, Unauthenticated(message, Reason.UNAUTHENTICATED))

    # -- tenant isolation and limits, before the servicer ------------------------------------
    async def _check(self, name: str, request, principal: Principal, context) -> None:
        if name == "RegisterNamespace":
            if not principal.may_use(request.tenant):
                await abort(context, PermissionDenied(
                    f"{principal.name} may not use tenant {request.tenant!r}; allowed: "
                    f"{sorted(principal.salts or ())}", Reason.TENANT_DENIED))
            return
        if not principal.arena and name == "AcquireLayers":
            # the layers arrive in the arena's slots: nothing to stream without it
            await abort(context, FailedPrecondition(
                f"{principal.name} is not trusted with the shared arena: a layer-wise get "
                "reads the blocks there; use Acquire and ReadBlocks", Reason.NOT_ENABLED))
        if not principal.arena and name == "ReportReads":
            # only a client reading the arena reads lease-free; no one else may move the
            # eviction order and write policies with reports of reads it could not make
            await abort(context, PermissionDenied(
                f"{principal.name} is not trusted with the shared arena: it reads no blocks "
                "without a lease, so it has none to report", Reason.ARENA_NOT_TRUSTED))
        if not principal.arena and (getattr(request, "want_hbm", False)
                                    or getattr(request, "to_hbm", False)
                                    or getattr(request, "hbm_filled", False)):
            await abort(context, PermissionDenied(
                f"{principal.name} is not trusted with the shared arena or the HBM pool (the "
                "daemon's arena_tenants); move bytes over gRPC", Reason.ARENA_NOT_TRUSTED))
        sid = getattr(request, "session_id", 0)
        if sid and principal.salts is not None and self._owner.get(sid) != principal.name:
            # The store's own words for a session that does not exist.
            await abort(context, NotFound(
                f"unknown session {sid}: open a session first (or reconnect)",
                Reason.UNKNOWN_SESSION))
        if name in _NS_CALLS or (name == "ReportFallbacks" and request.namespace_id):
            ns = self.store.namespaces.get(bytes(request.namespace_id))
            # For a tenant, unknown and foreign namespaces take this one path: same status,
            # same message, same work — neither existence nor timing tells them apart.
            if principal.salts is not None and (ns is None or not principal.may_use(ns.tenant)):
                await abort(context, NotFound(
                    f"unknown namespace {bytes(request.namespace_id).hex() or '(empty)'}: "
                    "register it first", Reason.UNKNOWN_NAMESPACE))
        if name == "Allocate" or name in _GETS:
            n_keys, rest = divmod(len(request.keys), KEY_BYTES)
            if rest or n_keys > self.store.max_batch_blocks:
                return  # malformed or oversized: the store answers INVALID_ARGUMENT
            ns = self.store.namespaces.get(bytes(request.namespace_id))
            want = n_keys * (ns.layout.block_bytes if ns else 0)
            key = self._client_key(principal, sid)
            # the leases this call ends first (release_lease_ids) count no longer
            ending = {(sid, lid) for lid in request.release_lease_ids} if name in _GETS \
                else ()
            await self._admit(self._clients[key], key, want, context, ending)

    async def _admit(self, client: _Client, key: str, want_bytes: int, context,
                     ending=()) -> None:
        self._prune(client)
        leases = client.leases
        if ending:
            leases = {k: v for k, v in leases.items() if k not in ending}
        n = len(client.allocations) + len(leases) + client.streams
        used = sum(client.allocations.values()) + sum(leases.values())
        lim = self.limits
        if n + 1 > lim.max_inflight_requests:
            why = (f"{n} puts/gets in flight (max_inflight_requests_per_client="
                   f"{lim.max_inflight_requests})")
        elif used + want_bytes > lim.max_inflight_bytes:
            why = (f"{used} + {want_bytes} bytes in flight exceeds "
                   f"max_inflight_bytes_per_client={lim.max_inflight_bytes}")
        else:
            return
        self.metrics.requests_throttled += 1
        await abort(context, ResourceExhausted(
            f"client {key} is over its limit: {why}; finish (commit/release) outstanding puts "
            "and gets, then retry", Reason.OVER_LIMIT))

    def _prune(self, client: _Client) -> None:
        """Forget allocations and leases the store no longer has (committed, expired, ...).

        The store owns them (``BlockStore.outstanding``); the client keeps only the bytes each
        was admitted with, which its limits count."""
        for table, which in ((client.allocations, 0), (client.leases, 1)):
            for k in [k for k in table if k[1] not in self.store.outstanding(k[0])[which]]:
                del table[k]

    # -- bookkeeping, after the servicer ---------------------------------------------------------
    def _after(self, name: str, request, response, principal: Principal, t0: float):
        """Record the call; returns the response the caller may see."""
        sid = getattr(request, "session_id", 0)
        if name == "Allocate":
            ns = self.store.namespaces.get(bytes(request.namespace_id))
            n = sum(1 for o in response.offsets if o >= 0)
            client = self._clients[self._client_key(principal, sid)]
            client.allocations[(sid, response.allocation_id)] = n * ns.layout.block_bytes
            self.metrics.put_started(response.allocation_id, t0)
            if not principal.arena:
                _hide_offsets(response.offsets)
        elif name == "Commit":
            self.metrics.put_finished(request.allocation_id, committed=not request.abort)
        elif name == "Acquire" and response.lease_id:
            ns = self.store.namespaces.get(bytes(request.namespace_id))
            client = self._clients[self._client_key(principal, sid)]
            client.leases[(sid, response.lease_id)] = len(response.offsets) * ns.layout.block_bytes
            self.metrics.get_started(response.lease_id, response.tiers[0], t0)
            if not principal.arena:
                _hide_offsets(response.offsets)
        elif name == "Lookup":
            self.metrics.lookup_finished(t0)
        elif name == "Release":
            self.metrics.get_finished(request.lease_id)
        elif name == "ReportReads":
            self.metrics.gets_reported(request.get_s)
        elif name == "GetStats":
            return self._visible_stats(response, principal)
        return response

    def _client_key(self, principal: Principal, session_id: int) -> str:
        if principal.salts is None:   # local clients are told apart by their sessions
            return f"session {session_id}" if session_id else "local"
        return principal.name

    def _session_opened(self, sid: int, principal: Principal) -> None:
        self._owner[sid] = principal.name
        self._principal_of[sid] = principal
        self._clients[self._client_key(principal, sid)].sessions.add(sid)

    def _session_closed(self, sid: int) -> None:
        self._owner.pop(sid, None)
        principal = self._principal_of.pop(sid, None)
        if principal is None:
            return
        key = self._client_key(principal, sid)
        client = self._clients.get(key)
        if client is not None:
            client.sessions.discard(sid)
            self._prune(client)
            if not client.sessions and not client.streams and not client.allocations \
                    and not client.leases:
                del self._clients[key]

    def _visible_stats(self, st: pb.Stats, principal: Principal) -> pb.Stats:
        """What ``principal`` may see of the daemon's statistics.

        The socket's owner and admin tokens see everything. A tenant sees its own figures only:
        the namespaces of salts it may use (blocks, bytes), its own sessions and outstanding
        leases, each tier's capacity, the daemon's version and uptime. Every other figure
        (tier use, hits, lookups, prefetch, fallbacks, auth failures, ...) is daemon-wide — it
        would tell one tenant what the others are doing — and reads 0 for a tenant."""
        if principal.admin:
            return st
        out = pb.Stats(daemon_version=st.daemon_version, uptime_s=st.uptime_s)
        for t in st.tiers:
            out.tiers.add(tier=t.tier, capacity_bytes=t.capacity_bytes)
        out.namespaces.extend(ns for ns in st.namespaces if principal.may_use(ns.tenant))
        client = self._clients.get(self._client_key(principal, 0))
        sessions = self.store.sessions
        mine = [sessions[sid] for sid in (client.sessions if client else ()) if sid in sessions]
        out.sessions = len(mine)
        out.active_leases = sum(len(s.leases) for s in mine)
        return out


def _hide_offsets(offsets) -> None:
    """Slot offsets are for clients that map the arena: others get 0 for every block to copy
    (the sign still says write / skip / no room) and never learn where a block lives."""
    offsets[:] = [0 if o >= 0 else o for o in offsets]
