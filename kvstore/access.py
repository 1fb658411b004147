"""The access layer: a server interceptor in front of the KVStore servicer.

For every call, before the servicer sees it:
1. authenticate (bearer token; required over TCP, optional on the Unix socket; the health
   service is exempt so Kubernetes gRPC probes work without credentials);
2. tenant isolation: a namespace whose tenant salt the caller may not use, and a session another
   caller opened, answer exactly like unknown ones (NOT_FOUND, same message, same early exit) —
   no existence oracle; registering a namespace under a salt the caller may not use is
   PERMISSION_DENIED;
3. per-client limits: outstanding puts and gets (allocations + leases) and active streams per
   client, in requests and bytes; over a limit is RESOURCE_EXHAUSTED for that client only.

After the call it times puts (allocate → commit) and gets (acquire → release) into the metrics,
and filters other tenants' namespaces out of statistics.
"""
from __future__ import annotations

import collections
import inspect
import logging
from dataclasses import dataclass

import grpc

from kvstore.auth import LOCAL, Principal, TokenTable, bearer_token
from kvstore.metrics import Metrics
from kvstore.v1 import kvstore_pb2 as pb

log = logging.getLogger("kvstore.access")

_SERVICE = "/kvstore.v1.KVStore/"
_EXEMPT = ("/grpc.health.v1.Health/",)
_NS_CALLS = {"Lookup", "Allocate", "Acquire", "Delete", "Prefetch", "PlanRecompute"}


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

    # -- the interceptor -----------------------------------------------------------------------
    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(_EXEMPT):
            return handler
        name = method[len(_SERVICE):] if method.startswith(_SERVICE) else None
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, name),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, name),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.stream_stream:   # server reflection
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_bidi(handler.stream_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler

    def _wrap_unary(self, inner, name):
        async def behavior(request, context):
            principal = await self._authenticate(context)
            if name:
                await self._check(name, request, principal, context)
            t0 = self.metrics.clock()
            response = inner(request, context)
            if inspect.isawaitable(response):
                response = await response
            if name and response is not None:
                self._after(name, request, response, principal, t0)
            return response
        return behavior

    def _wrap_stream(self, inner, name):
        async def behavior(request, context):
            principal = await self._authenticate(context)
            if name:
                await self._check(name, request, principal, context)
            key = self._client_key(principal, getattr(request, "session_id", 0))
            client = self._clients[key]
            counted = name == "ReadBlocks"
            if counted:
                await self._admit(client, key, 0, context)
                client.streams += 1
            opened = None
            try:
                async for msg in inner(request, context):
                    if name == "OpenSession" and opened is None:
                        opened = msg.session_id
                        self._session_opened(opened, principal)
                    elif name in ("GetStats", "WatchStats"):
                        msg = self._visible_stats(msg, principal)
                    yield msg
            finally:
                if counted:
                    client.streams -= 1
                if opened is not None:
                    self._session_closed(opened)
        return behavior

    def _wrap_bidi(self, inner):
        async def behavior(request_iterator, context):
            await self._authenticate(context)
            async for msg in inner(request_iterator, context):
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
        log.warning("refused a call from %s: %s", context.peer(), message)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    # -- tenant isolation and limits, before the servicer ------------------------------------
    async def _check(self, name: str, request, principal: Principal, context) -> None:
        if name == "RegisterNamespace":
            if not principal.may_use(request.tenant):
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{principal.name} may not use tenant {request.tenant!r}; allowed: "
                    f"{sorted(principal.salts or ())}")
            return
        sid = getattr(request, "session_id", 0)
        if sid and principal.salts is not None and self._owner.get(sid) != principal.name:
            # The store's own words for a session that does not exist.
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"unknown session {sid}: open a session first (or reconnect)")
        if name in _NS_CALLS or (name == "ReportFallbacks" and request.namespace_id):
            ns = self.store.namespaces.get(bytes(request.namespace_id))
            # For a tenant, unknown and foreign namespaces take this one path: same status,
            # same message, same work — neither existence nor timing tells them apart.
            if principal.salts is not None and (ns is None or not principal.may_use(ns.tenant)):
                await context.abort(grpc.StatusCode.NOT_FOUND,
                                    f"unknown namespace {bytes(request.namespace_id).hex() or '(empty)'}"
                                    ": register it first")
        if name in ("Allocate", "Acquire"):
            n_keys, rest = divmod(len(request.keys), 16)
            if rest or n_keys > self.store.max_batch_blocks:
                return  # malformed or oversized: the store answers INVALID_ARGUMENT
            ns = self.store.namespaces.get(bytes(request.namespace_id))
            want = n_keys * (ns.layout.block_bytes if ns else 0)
            key = self._client_key(principal, sid)
            await self._admit(self._clients[key], key, want, context)

    async def _admit(self, client: _Client, key: str, want_bytes: int, context) -> None:
        self._prune(client)
        n = len(client.allocations) + len(client.leases) + client.streams
        used = sum(client.allocations.values()) + sum(client.leases.values())
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
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"client {key} is over its limit: {why}; finish (commit/release) "
                            "outstanding puts and gets, then retry")

    def _prune(self, client: _Client) -> None:
        """Forget allocations and leases the store no longer has (committed, expired, ...)."""
        sessions = self.store.sessions
        for table, attr in ((client.allocations, "allocations"), (client.leases, "leases")):
            for k in [k for k in table
                      if k[0] not in sessions or k[1] not in getattr(sessions[k[0]], attr)]:
                del table[k]

    # -- bookkeeping, after the servicer ---------------------------------------------------------
    def _after(self, name: str, request, response, principal: Principal, t0: float) -> None:
        sid = getattr(request, "session_id", 0)
        if name == "Allocate":
            ns = self.store.namespaces.get(bytes(request.namespace_id))
            n = sum(1 for o in response.offsets if o >= 0)
            client = self._clients[self._client_key(principal, sid)]
            client.allocations[(sid, response.allocation_id)] = n * ns.layout.block_bytes
            self.metrics.put_started(response.allocation_id, t0)
        elif name == "Commit":
            self.metrics.put_finished(request.allocation_id, committed=not request.abort)
        elif name == "Acquire" and response.lease_id:
            ns = self.store.namespaces.get(bytes(request.namespace_id))
            client = self._clients[self._client_key(principal, sid)]
            client.leases[(sid, response.lease_id)] = len(response.offsets) * ns.layout.block_bytes
            self.metrics.get_started(response.lease_id, response.tiers[0], t0)
        elif name == "Release":
            self.metrics.get_finished(request.lease_id)
        elif name == "GetStats":
            filtered = self._visible_stats(response, principal)
            if filtered is not response:
                response.ClearField("namespaces")
                response.namespaces.extend(filtered.namespaces)

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

    @staticmethod
    def _visible_stats(st: pb.Stats, principal: Principal) -> pb.Stats:
        """A tenant sees its own namespaces only; tier totals are shared by everyone."""
        if principal.salts is None:
            return st
        out = pb.Stats()
        out.CopyFrom(st)
        out.ClearField("namespaces")
        out.namespaces.extend(ns for ns in st.namespaces if principal.may_use(ns.tenant))
        return out

