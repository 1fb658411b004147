"""The remote (cluster) tier: KV blocks shared across hosts through an existing distributed
engine — Mooncake Store (``mooncake://MASTER:PORT``) or Redis / Valkey (``redis://H:P,...``).

    base.py           the backend contract (what an engine must do) and the URL
    codec.py          remote keys and the verified value header
    breaker.py        the circuit breaker
    mooncake.py       Mooncake Store backend (zero-copy through the registered arena)
    redis_cluster.py  Redis Cluster / single Redis backend
    slots.py          FillSlots: the narrow interface to the daemon's slots the tier is handed
    engine.py         engine calls: bounded pool, deadlines, breaker, the shared counters
    fills.py          the read path: lookup, verified fills into arena slots
    writes.py         the write queue: committed blocks to the engine in the background
    tier.py           RemoteTier: the two paths composed (the daemon's one handle)

``open_remote_tier`` is what the daemon's composition root (kvstore/daemon/server.py) calls.
"""
from __future__ import annotations

from kvstore.tiers.remote.base import RemoteBackend, RemoteError, parse_remote_url
from kvstore.tiers.remote.breaker import CircuitBreaker
from kvstore.tiers.remote.tier import RemoteTier

__all__ = ["RemoteBackend", "RemoteError", "RemoteTier", "open_backend", "open_remote_tier",
           "parse_remote_url"]


def open_backend(url: str, *, segment_bytes: int = 256 << 20, buffer_bytes: int = 64 << 20,
                 replicas: int = 1, local_host: str = "", timeout_s: float = 2.0,
                 node_retry_s: float = 1.0) -> RemoteBackend:
    """The engine client for ``url`` (not yet connected: backends connect on first use).
    Raises ValueError for a bad URL, RemoteError when the engine's client is not installed."""
    u = parse_remote_url(url)
    if u.scheme == "mooncake":
        from kvstore.tiers.remote.mooncake import MooncakeBackend
        host, port = u.hosts[0]
        return MooncakeBackend(f"{host}:{port}", segment_bytes, buffer_bytes, replicas,
                               local_host)
    from kvstore.tiers.remote.redis_cluster import RedisBackend
    return RedisBackend(u.hosts, timeout_s, node_retry_s)


def open_remote_tier(cfg, slots) -> RemoteTier:
    """Build the remote tier from the daemon's configuration (the ``remote*`` keys);
    ``slots``: a kvstore.tiers.remote.slots.FillSlots."""
    backend = open_backend(cfg.remote, segment_bytes=cfg.remote_segment_bytes,
                           buffer_bytes=cfg.remote_buffer_bytes, replicas=cfg.remote_replicas,
                           local_host=cfg.remote_local_host,
                           # a socket timeout, not the tier's deadline: calls run in the
                           # pool under their own deadlines; a busy server is not an error
                           timeout_s=max(5.0, cfg.remote_read_deadline_s),
                           node_retry_s=cfg.remote_retry_s)
    return RemoteTier(slots, backend, str(parse_remote_url(cfg.remote)),
                      policy=cfg.remote_write_policy, write_hits=cfg.remote_write_hits,
                      deadline_s=cfg.remote_deadline_s, read_deadline_s=cfg.remote_read_deadline_s,
                      threads=cfg.remote_threads, queue_blocks=cfg.remote_queue_blocks,
                      read_chunk_bytes=cfg.remote_read_chunk_bytes,
                      fill_on_lookup=cfg.remote_fill_on_lookup,
                      flush_deadline_s=cfg.remote_flush_deadline_s,
                      breaker=CircuitBreaker(cooldown_s=cfg.remote_retry_s))
