"""Redis / Valkey backend: a Redis Cluster (several nodes in the URL, or one node that reports
``cluster_enabled``) or a single Redis server.

Values are one string per block (header | bytes): SET from ``header + slot`` (one copy, to join
them; the protocol sends one contiguous argument) and pipelined GETs whose replies are copied
into the arena slots (the client allocates each reply; one copy from there into the slot).
Existence is a pipeline of EXISTS, one per key (keys of a batch hash to different slots, and a
multi-key EXISTS must stay within one slot in a cluster).

Connection is lazy and retried after failures, like the Mooncake backend, so the daemon starts
while the cluster is down. Every Redis exception is a RemoteError for the whole call (a cluster
pipeline fails as a whole when a node is down): the tier treats it as a miss.
"""
from __future__ import annotations

import logging
import threading

from kvstore.tiers.remote.base import RemoteBackend, RemoteError
from kvstore.tiers.remote.codec import HEADER_BYTES

log = logging.getLogger("kvstore.remote.redis")


class RedisBackend(RemoteBackend):
    name = "redis"

    def __init__(self, hosts: tuple[tuple[str, int], ...], timeout_s: float = 2.0):
        try:
            import redis
        except ImportError as exc:
            raise RemoteError(f"the Redis client is not installed ({exc}): pip install "
                              "'kvstore[redis]'") from None
        self._redis = redis
        self.hosts = hosts
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._client = None
        self._arena: memoryview | None = None
        self.cluster = False

    def attach(self, arena_buffer: memoryview) -> None:
        self._arena = arena_buffer

    def _connected(self):
        c = self._client
        if c is not None:
            return c
        with self._lock:
            if self._client is None:
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
                self._client = c
                log.info("Redis: connected to %s (%s)", self._where(),
                         "cluster" if cluster else "single node")
            return self._client

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
        with self._lock:
            c, self._client = self._client, None
        if c is not None:
            try:
                c.close()
            except Exception:
                pass

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
        arena = self._arena
        out: list[bytes | None] = []
        for v, off, n in zip(self._pipeline(lambda p: [p.get(k) for k in keys]), offsets, sizes):
            if v is None:
                out.append(None)
            elif len(v) != HEADER_BYTES + n:
                out.append(b"")
            else:
                mv = memoryview(v)
                arena[off:off + n] = mv[HEADER_BYTES:]
                out.append(bytes(mv[:HEADER_BYTES]))
        return out

    def remove(self, keys: list[str]) -> None:
        self._pipeline(lambda p: [p.delete(k) for k in keys])

    def ping(self) -> bool:
        try:
            return bool(self._connected().ping())
        except self._redis.RedisError as exc:
            self._reset()
            raise RemoteError(f"Redis {self._where()}: {exc}") from None

    def close(self) -> None:
        self._reset()
