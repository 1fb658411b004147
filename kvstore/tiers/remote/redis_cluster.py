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

Connection is lazy and retried after failures, like the Mooncake backend, so the daemon starts
while the cluster is down. Every Redis exception is a RemoteError for the whole call (a cluster
pipeline fails as a whole when a node is down): the tier treats it as a miss.
"""
from __future__ import annotations

import logging
import socket
import threading

from kvstore.tiers.remote.base import LazyClient, RemoteBackend, RemoteError, import_engine
from kvstore.tiers.remote.codec import HEADER_BYTES

log = logging.getLogger("kvstore.remote.redis")


class RedisBackend(RemoteBackend):
    name = "redis"

    def __init__(self, hosts: tuple[tuple[str, int], ...], timeout_s: float = 2.0):
        self._redis = import_engine("redis", "redis")
        self.hosts = hosts
        self.timeout_s = timeout_s
        self._lock = threading.Lock()     # guards _raw_all
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

    def _pipeline(self, build) -> list:
        c = self._connected()
        try:
            pipe = c.pipeline(transaction=False)
            build(pipe)
            return pipe.execute()
        except self._redis.RedisError as exc:
            if isinstance(exc, (self._redis.ConnectionError, self._redis.TimeoutError)):
                self._reset()
            raise RemoteError(f"Redis {self._where()}: {exc}") from None

    def _reset(self) -> None:
        # A dead node or a restarted cluster: connect afresh on the next call (the cluster client
        # also rediscovers the topology then).
        self._client.reset()

    def exists(self, keys: list[str]) -> list[bool]:
        res = self._pipeline(lambda p: [p.exists(k) for k in keys])
        return [bool(r) for r in res]

    def put(self, keys, headers, offsets, sizes) -> list[bool]:
        arena = self._arena

        def build(p):
            for k, h, off, n in zip(keys, headers, offsets, sizes):
                p.set(k, b"".join((h, arena[off:off + n])))
        return [bool(r) for r in self._pipeline(build)]

    def get_into(self, keys, offsets, sizes) -> list[bytes | None]:
        c = self._connected()
        arena = self._arena
        try:
            # Route every key to its node, send each node its pipeline, then read the replies
            # node by node (the others' wait in their sockets' buffers meanwhile).
            by_node: dict[tuple[str, int], list[int]] = {}
            for i, k in enumerate(keys):
                if self.cluster:
                    node = c.get_node_from_key(k)
                    addr = (node.host, node.port)
                else:
                    addr = self.hosts[0]
                by_node.setdefault(addr, []).append(i)
            conns = {addr: self._raw_conn(addr) for addr in by_node}
            for addr, idx in by_node.items():
                conns[addr].send_gets([keys[i] for i in idx])
            out: list[bytes | None] = [None] * len(keys)
            moved = False
            for addr, idx in by_node.items():
                conn = conns[addr]
                for i in idx:
                    n = sizes[i]
                    out[i], was_moved = conn.read_get(arena[offsets[i]:offsets[i] + n], n)
                    moved |= was_moved
        except (OSError, _ProtocolError, self._redis.RedisError) as exc:
            self._drop_raw_conns()
            if isinstance(exc, (OSError, self._redis.ConnectionError)):
                self._reset()
            raise RemoteError(f"Redis {self._where()}: {exc}") from None
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

    def _drop_raw_conns(self) -> None:
        conns = getattr(self._tls, "conns", None) or {}
        with self._lock:
            self._raw_all.difference_update(conns.values())
        for conn in conns.values():
            conn.close()
        conns.clear()

    def remove(self, keys: list[str]) -> None:
        self._pipeline(lambda p: [p.delete(k) for k in keys])

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
        no such key, or an error reply) | (b"": a value of another length, skipped); and
        whether the reply was MOVED/ASK."""
        line = self._line()
        kind = line[:1]
        if kind == b"-":
            return None, line.startswith((b"-MOVED", b"-ASK"))
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
