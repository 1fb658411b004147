"""Redis / Valkey backend: a Redis Cluster (several nodes in the URL, or one node that reports
``cluster_enabled``) or a single Redis server.

Values are one string per block (header | bytes): SET from ``header + slot`` (one copy, to join
them; the protocol sends one contiguous argument). Reads do not go through redis-py: its parser
allocates every 2 MiB reply (fresh pages, faulted in) before the copy into the slot, which cost
more than the transfer itself. Instead each thread keeps a plain socket per node and pipelines
GETs on it, reading each bulk reply's 64-byte header into a small buffer and its block bytes
straight into the arena slot (``recv_into``): no allocation, no copy. Keys are routed to nodes
with the cluster client's slot map; a MOVED/ASK reply (resharding, failover) is a miss for that
key and makes the next call rediscover the topology.
Existence is a pipeline of EXISTS, one per key (keys of a batch hash to different slots, and a
multi-key EXISTS must stay within one slot in a cluster).

Every call is split by node, and each node's part runs (and fails) on its own: a dead master
(no replica; ``cluster-require-full-coverage no``) costs the keys its slots hold — misses for
reads and existence checks, writes not sent — while the keys on live nodes are read and written
as usual. Each node has its own circuit breaker (a node that keeps failing is not called, so a
dead one does not cost a connect per call; one probe goes through after the cooldown) and its
own counters (``nodes()``). A call is a RemoteError only when the cluster client cannot be had.

Connection is lazy and retried after failures, like the Mooncake backend, so the daemon starts
while the cluster is down.
"""
from __future__ import annotations

import logging
import socket
import threading

from dataclasses import dataclass, field

from kvstore.tiers.remote.base import LazyClient, RemoteBackend, RemoteError, import_engine
from kvstore.tiers.remote.breaker import CircuitBreaker
from kvstore.tiers.remote.codec import HEADER_BYTES, ReadStatus

log = logging.getLogger("kvstore.remote.redis")


@dataclass
class NodeHealth:
    """One node's breaker and counters (guarded by the backend's lock)."""
    breaker: CircuitBreaker
    errors: int = 0              # calls to this node that failed
    keys_unavailable: int = 0    # keys not read or written because the node failed or was skipped
    last_error: str = field(default="")


class RedisBackend(RemoteBackend):
    name = "redis"

    def __init__(self, hosts: tuple[tuple[str, int], ...], timeout_s: float = 2.0,
                 node_retry_s: float = 1.0):
        self._redis = import_engine("redis", "redis")
        self.hosts = hosts
        self.timeout_s = timeout_s
        self.node_retry_s = node_retry_s
        self._lock = threading.Lock()     # guards _raw_all and _health
        self._health: dict[tuple[str, int], NodeHealth] = {}
        self._client = LazyClient(self._connect, lambda c: c.close())
        self._arena: memoryview | None = None
        self._tls = threading.local()     # this thread's raw read connections, by node
        self._raw_all: set[_RawConn] = set()   # every thread's, closed by close()
        self.cluster = False

    def attach(self, arena_buffer: memoryview) -> None:
        self._arena = arena_buffer

    def _connect(self):
        r = self._redis
        kw = dict(socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s)
        try:
            cluster = len(self.hosts) > 1
            if not cluster:
                probe = r.Redis(host=self.hosts[0][0], port=self.hosts[0][1], **kw)
                try:
                    cluster = bool(probe.info("cluster").get("cluster_enabled"))
                finally:
                    probe.close()
            if cluster:
                from redis.cluster import ClusterNode, RedisCluster
                c = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in self.hosts],
                                 require_full_coverage=False, **kw)
            else:
                c = r.Redis(host=self.hosts[0][0], port=self.hosts[0][1], **kw)
                c.ping()
        except r.RedisError as exc:
            raise RemoteError(f"Redis {self._where()}: {exc}") from None
        self.cluster = cluster
        log.info("Redis: connected to %s (%s)", self._where(),
                 "cluster" if cluster else "single node")
        return c

    def _connected(self):
        return self._client.get()

    def _where(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self.hosts)

    # -- one call, split by node ---------------------------------------------------------------
    def _route(self, c, keys: list[str]) -> dict[tuple[str, int], list[int]]:
        by_node: dict[tuple[str, int], list[int]] = {}
        for i, k in enumerate(keys):
            if self.cluster:
                node = c.get_node_from_key(k)
                addr = (node.host, node.port)
            else:
                addr = self.hosts[0]
            by_node.setdefault(addr, []).append(i)
        return by_node

    def _node_health(self, addr) -> NodeHealth:
        h = self._health.get(addr)
        if h is None:
            h = self._health[addr] = NodeHealth(CircuitBreaker(cooldown_s=self.node_retry_s))
        return h

    def _allow(self, addr, n_keys: int) -> bool:
        with self._lock:
            h = self._node_health(addr)
            if h.breaker.allow():
                return True
            h.keys_unavailable += n_keys
            return False

    def _node_done(self, addr, exc: BaseException | None, n_keys: int = 0) -> None:
        with self._lock:
            h = self._node_health(addr)
            if exc is None:
                h.breaker.success()
                return
            was = h.breaker.state
            h.breaker.failure()
            h.errors += 1
            h.keys_unavailable += n_keys
            h.last_error = str(exc)[:200]
            if h.breaker.state != was:
                log.warning("Redis node %s:%d: %s; circuit %s (its keys are misses)", addr[0],
                            addr[1], exc, h.breaker.state)

    def nodes(self) -> list[tuple[str, str, int, int]]:
        """(node, circuit state, failed calls, keys not read or written) per node seen."""
        with self._lock:
            return [(f"{a[0]}:{a[1]}", h.breaker.state, h.errors, h.keys_unavailable)
                    for a, h in sorted(self._health.items())]

    def _per_node(self, keys: list[str], run, unavailable) -> list:
        """``run(node_client, addr, idx)`` answers the keys ``idx`` of one node; a node that
        fails (or whose circuit is open) answers ``unavailable`` for each of its keys — never
        an error for the call: the tier's own breaker must not stop the live nodes' keys for
        a dead one (each node has its breaker here). RemoteError only when the cluster client
        cannot be had (no node reachable to learn the topology from)."""
        c = self._connected()
        out = [unavailable] * len(keys)
        try:
            by_node = self._route(c, keys)
        except self._redis.RedisError as exc:
            self._reset()
            raise RemoteError(f"Redis {self._where()}: {exc}") from None
        for addr, idx in by_node.items():
            if not self._allow(addr, len(idx)):
                continue
            try:
                node_client = (c.get_redis_connection(c.get_node(addr[0], addr[1]))
                               if self.cluster else c)
                res = run(node_client, addr, idx)
            except (OSError, _ProtocolError, self._redis.RedisError) as exc:
                self._node_done(addr, exc, len(idx))
                continue
            self._node_done(addr, None)
            for i, r in zip(idx, res):
                out[i] = r
        return out

    def _reset(self) -> None:
        # A restarted cluster or a stale slot map: connect afresh on the next call (the
        # cluster client rediscovers the topology then).
        self._client.reset()

    @staticmethod
    def _pipe(node_client, build) -> list:
        pipe = node_client.pipeline(transaction=False)
        build(pipe)
        res = pipe.execute(raise_on_error=False)
        for r in res:
            if isinstance(r, Exception):
                raise r        # MOVED, a node answering an error: the node's part failed
        return res

    def exists(self, keys: list[str]) -> list[bool]:
        def run(node, addr, idx):
            return [bool(r) for r in self._pipe(node, lambda p: [p.exists(keys[i])
                                                                 for i in idx])]
        return self._per_node(keys, run, False)

    def put(self, keys, headers, offsets, sizes) -> list[bool | None]:
        """As RemoteBackend.put; None for a key whose node was unavailable (not sent)."""
        arena = self._arena

        def run(node, addr, idx):
            def build(p):
                for i in idx:
                    off, n = offsets[i], sizes[i]
                    p.set(keys[i], b"".join((headers[i], arena[off:off + n])))
            return [bool(r) for r in self._pipe(node, build)]
        return self._per_node(keys, run, None)

    def get_into(self, keys, offsets, sizes) -> list:
        arena = self._arena
        moved = False

        def run(node, addr, idx):
            # raw socket: the block bytes go straight into the arena slots (module docstring)
            nonlocal moved
            conn = self._raw_conn(addr)
            try:
                conn.send_gets([keys[i] for i in idx])
                res = []
                for i in idx:
                    n = sizes[i]
                    header, was_moved = conn.read_get(arena[offsets[i]:offsets[i] + n], n)
                    moved |= was_moved
                    res.append(ReadStatus.FAILED if was_moved else header)
                return res
            except BaseException:
                self._drop_raw_conn(addr)
                raise
        out = self._per_node(keys, run, ReadStatus.FAILED)
        if moved:
            self._drop_raw_conns()
            self._reset()      # the slot map is stale: the cluster client rediscovers it
        return out

    def _raw_conn(self, addr: tuple[str, int]) -> "_RawConn":
        conns = getattr(self._tls, "conns", None)
        if conns is None:
            conns = self._tls.conns = {}
        conn = conns.get(addr)
        if conn is None:
            conn = conns[addr] = _RawConn(addr, self.timeout_s)
            with self._lock:
                self._raw_all.add(conn)
        return conn

    def _drop_raw_conn(self, addr) -> None:
        conns = getattr(self._tls, "conns", None) or {}
        conn = conns.pop(addr, None)
        if conn is not None:
            with self._lock:
                self._raw_all.discard(conn)
            conn.close()

    def _drop_raw_conns(self) -> None:
        conns = getattr(self._tls, "conns", None) or {}
        with self._lock:
            self._raw_all.difference_update(conns.values())
        for conn in conns.values():
            conn.close()
        conns.clear()

    def remove(self, keys: list[str]) -> None:
        self._per_node(keys, lambda node, addr, idx: self._pipe(
            node, lambda p: [p.delete(keys[i]) for i in idx]), None)

    def ping(self) -> bool:
        try:
            return bool(self._connected().ping())
        except self._redis.RedisError as exc:
            self._reset()
            raise RemoteError(f"Redis {self._where()}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            raw, self._raw_all = self._raw_all, set()
        for conn in raw:
            conn.close()
        self._reset()


class _ProtocolError(Exception):
    """A reply that is not what a GET answers (the connection is dropped)."""


class _RawConn:
    """One node's socket for pipelined GETs, read without allocating the values (RESP2)."""

    def __init__(self, addr: tuple[str, int], timeout_s: float):
        self.sock = socket.create_connection(addr, timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray(1 << 16)
        self.view = memoryview(self.buf)
        self.lo = self.hi = 0
        self.header = bytearray(HEADER_BYTES)

    def send_gets(self, keys: list[str]) -> None:
        parts = []
        for k in keys:
            kb = k.encode()
            parts.append(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(kb), kb))
        self.sock.sendall(b"".join(parts))

    def read_get(self, slot: memoryview, n: int) -> tuple[bytes | None, bool]:
        """One GET reply: (the header, with the block bytes written into ``slot``) | (None:
        no such key) | (FAILED: an error reply) | (b"": a value of another length, skipped); and
        whether the reply was MOVED/ASK."""
        line = self._line()
        kind = line[:1]
        if kind == b"-":      # an error reply proves nothing about the value: not a miss
            return ReadStatus.FAILED, line.startswith((b"-MOVED", b"-ASK"))
        if kind != b"$":
            raise _ProtocolError(f"unexpected reply to GET: {line[:40]!r}")
        length = int(line[1:])
        if length < 0:
            return None, False
        if length != HEADER_BYTES + n:
            self._skip(length + 2)
            return b"", False
        self._read_into(memoryview(self.header))
        self._read_into(slot)
        self._skip(2)                     # the reply's CRLF
        return bytes(self.header), False

    def _fill(self) -> None:
        if self.lo == self.hi:
            self.lo = self.hi = 0
        elif self.hi == len(self.buf):
            rest = self.hi - self.lo
            self.buf[:rest] = self.buf[self.lo:self.hi]
            self.lo, self.hi = 0, rest
        got = self.sock.recv_into(self.view[self.hi:])
        if not got:
            raise ConnectionError("the Redis node closed the connection")
        self.hi += got

    def _line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n", self.lo, self.hi)
            if i >= 0:
                line = bytes(self.buf[self.lo:i])
                self.lo = i + 2
                return line
            if self.hi - self.lo > 4096:
                raise _ProtocolError("reply line too long")
            self._fill()

    def _read_into(self, dst: memoryview) -> None:
        n = len(dst)
        take = min(n, self.hi - self.lo)
        if take:
            dst[:take] = self.view[self.lo:self.lo + take]
            self.lo += take
        pos = take
        while pos < n:
            got = self.sock.recv_into(dst[pos:])
            if not got:
                raise ConnectionError("the Redis node closed the connection")
            pos += got

    def _skip(self, n: int) -> None:
        while n:
            if self.lo == self.hi:
                self._fill()
            take = min(n, self.hi - self.lo)
            self.lo += take
            n -= take

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
