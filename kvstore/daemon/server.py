"""The daemon's lifecycle: create the arena, listen, serve, and shut down cleanly.

SIGTERM or SIGINT: stop accepting, let in-flight calls finish (grace period, shutdown_grace_s),
end every session (reclaiming its leases), unlink the arena and the socket, exit 0.

Ownership: a daemon removes only what it created. The socket is unlinked at shutdown only when the
file at that path is still the one this daemon bound (same device, inode and ctime), so a second
daemon refused because the socket is taken, or one whose path was since taken over, leaves it
alone; the arena file is this process's own (its name carries the pid).

Start-up: before anything is bound the daemon holds an exclusive flock on ``<socket>.lock``
(kvstore.core.lockfile; and SlabFiles one on the SSD directory's ``lock``), so of two daemons
started together on one socket exactly one serves; the other exits 1 naming the holder's pid.

Start-up failures: a value in the configuration that cannot be used on this host (an SSD
directory that is a file or not writable, an ssd_bytes larger than the free disk, hbm_bytes
without CUDA, a missing shm_dir, ...) raises ConfigError, which the CLI answers with exit code 2
and a message saying what to change; anything else in the way (another daemon on the socket or
the SSD directory, a directory of another format, a port in use) raises DaemonError (exit 1). A
start-up that failed releases what it had opened without logging a shutdown, and removes the
SSD files it created (a restart must not misread a half-made directory).

DRAM sizing: the arena holds whole chunks only; a dram_bytes that is not a multiple of the chunk
size is rounded down to one, logged, and only that is reserved (kvstore.tiers.dram.arena_geometry).

Access: the Unix socket is born 0600 (or widened to 0660 for socket_group); TCP needs tokens
and may use TLS. Every call passes the access layer (kvstore.access.interceptor) before the servicer.
SIGHUP re-reads the tokens file (a bad file keeps the tokens in force and logs why).

SSD index: loaded in the background once the socket answers (SSDTier.start_recovery): DRAM
serves at once, SSD blocks appear as their batches land, write-through commits are written into
slots the load does not claim and journaled in the journal as found (durable when answered);
the health probe says SERVING from the first answer on.

Composition root: ``Daemon.start`` builds every part and hands each its collaborators through
its constructor, in dependency order — block table, DRAM tier, HBM tier, SSD tier (files, catalog,
space manager, write policy, GPUDirect reader), the store over them, the cluster tier, the
prefetcher, the read and write paths (kvstore.store.reads, kvstore.store.writes: which parts
hear of every get's hits and every commit's blocks is decided here), metrics, access policy and
servicer. No part attaches itself to another; the table
frees a block's copies through the TierSet the tiers are added to here.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import logging
import os
import signal
import socket as socketlib
import stat
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvstore import __version__
from kvstore.core import lockfile, shmindex
from kvstore.core import slotgen
from kvstore.access.interceptor import AccessPolicy, Limits
from kvstore.core.arena import HEADER_BYTES, Arena, ArenaError, ArenaPreparer
from kvstore.core.shmfile import remove_orphans
from kvstore.access.auth import TokenTable, socket_mode, tls_credentials
from kvstore.daemon.config import Config, ConfigError
from kvstore.planner.bandwidth import measure_memcpy_bps
from kvstore.metrics.model import Metrics
from kvstore.policies.eviction import DEFAULT_EVICTION, eviction_policy
from kvstore.prefetch.prefetcher import Prefetcher
from kvstore.metrics.http import MetricsServer
from kvstore.daemon.service import KVStoreServicer, stats_message
from kvstore.store.blockstore import BlockStore, TierSet
from kvstore.store.reads import ReadPath
from kvstore.store.writes import WritePath
from kvstore.store.table import BlockTable
from kvstore.tiers.dram import DRAMTier, arena_geometry
from kvstore.core.units import format_bytes
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

log = logging.getLogger("kvstore.daemon.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KVStore"].full_name
SHUTDOWN_GRACE_S = 5.0
EXPIRE_INTERVAL_S = 1.0
METRICS_SAMPLE_S = 1.0


class DaemonError(RuntimeError):
    """The daemon cannot start (socket in use, arena too large, ...)."""


def _unusable_path(key: str, path, exc: OSError, what: str = "directory") -> ConfigError:
    """A ConfigError for a configured path the daemon cannot use, saying what to change."""
    flag = "--" + key.replace("_", "-")
    where = exc.filename or path
    if str(where).startswith(f"{path}/"):    # a file the daemon would create inside path
        where = path
    if exc.errno == errno.ENOENT:
        why = f"{where} does not exist; create it or set {flag} to an existing {what}"
    elif exc.errno in (errno.ENOTDIR, errno.EEXIST):
        why = f"{where} is not a directory; set {flag} to a {what} (or remove that file)"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = (f"{where} is not writable by uid {os.getuid()} ({exc.strerror}); set {flag} to a "
               f"writable {what} or fix its permissions")
    elif exc.errno == errno.ENOSPC:
        why = f"{exc.strerror}"
    else:
        why = f"{where}: {exc.strerror or exc}; set {flag} to a usable {what}"
    return ConfigError(f"{key} {path}: {why}")


def _file_identity(path: Path) -> tuple[int, ...]:
    """Device, inode and change time: an inode number alone is reused once a file is gone."""
    st = path.lstat()
    return st.st_dev, st.st_ino, st.st_ctime_ns


def socket_answers(path: str | Path) -> bool:
    """Something accepts connections on the Unix socket at path (a live daemon)."""
    probe = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def lock_path(sock: Path) -> Path:
    """The lock file beside a socket: held (flock) by the daemon serving that socket."""
    return sock.with_name(sock.name + ".lock")


def _prepare_socket(path: Path) -> int:
    """Lock the socket's lock file, then clear a stale socket; returns the lock descriptor.
    The lock covers both the liveness probe and the rename of the bound socket into place:
    without it two daemons started together both find the path free and one is orphaned."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_fd = lockfile.take(lock_path(path))
    except lockfile.LockHeld as exc:
        raise DaemonError(f"another daemon is listening on {path} (pid {exc.pid} holds "
                          f"{exc.path}); stop it or set --socket to another path") from None
    except OSError as exc:
        raise _unusable_path("socket", path, exc, "path in a writable directory") from None
    try:
        _clear_stale_socket(path)
    except BaseException:
        lockfile.release(lock_fd, lock_path(path))
        raise
    return lock_fd


def _clear_stale_socket(path: Path) -> None:
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ConfigError(f"socket {path}: exists and is not a socket; refusing to replace "
                              f"it: set --socket to another path (or remove that file)")
        if socket_answers(path):
            raise DaemonError(f"another daemon is listening on {path}")
        path.unlink()  # stale socket of a daemon that died


class Daemon:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.stopping = asyncio.Event()
        self.server: grpc.aio.Server | None = None
        self.arena: Arena | None = None
        self.generations: slotgen.SlotGenerations | None = None
        self.snapshot: shmindex.ShmIndex | None = None
        self.store: BlockStore | None = None
        self.ssd = None        # kvstore.tiers.ssd.tier.SSDTier when --ssd-bytes is set
        self.hbm = None        # kvstore.tiers.hbm.HBMTier when --hbm-bytes is set
        self.prefetcher: Prefetcher | None = None
        self.reads: ReadPath | None = None     # the get path (kvstore.store.reads)
        self.writes: WritePath | None = None   # the put path (kvstore.store.writes)
        self.access: AccessPolicy | None = None
        self._started = False                  # serving: stop() then logs the shutdown
        self._socket_id: tuple[int, ...] | None = None   # _file_identity of the socket we bound
        self.remote = None     # kvstore.tiers.remote.RemoteTier when --remote is set
        self.events = None     # kvstore.events.publisher.EventPublisher when kv_events_endpoint
        self._lock_fd: int | None = None   # flock on the socket's lock file (take_lock)
        self.engine_calls_abandoned = False   # the remote engine's client outlived shutdown

    async def start(self) -> None:
        """Build every part, bind, serve; on a failure :meth:`stop` releases what was opened."""
        cfg = self.cfg
        sock = Path(cfg.socket)
        sock_mode, sock_gid = socket_mode(cfg.socket_group)
        tokens = TokenTable.from_config(cfg.tokens_file, cfg.auth_token, cfg.arena_tenants)
        tls = tls_credentials(cfg.tls_cert_file, cfg.tls_key_file) if cfg.tls_cert_file else None
        self._lock_fd = _prepare_socket(sock)
        for p in remove_orphans(Path(cfg.shm_dir) if cfg.shm_dir else None):
            log.info("removed %s, left by a daemon that is gone", p)
        self._open_shared_memory()
        self._compose(asyncio.get_running_loop())
        self._build_server(tokens)
        tcp = self._bind(sock, tls)
        await self._serve(sock, sock_mode, sock_gid)
        self._log_started(sock, sock_mode, tcp, tls, tokens)

    def _open_shared_memory(self) -> None:
        """The arena (first chunk reserved), its slot generations and the index snapshot."""
        cfg = self.cfg
        # Serve at once: the arena's memory is reserved and populated in the background, and
        # the allocator takes each chunk as it is reserved (kvstore.core.arena, "Preparation").
        # The first chunk is reserved here, so the first put never finds nothing ready.
        # Only whole chunks hold slots: reserve exactly those (no memory held that no slot uses).
        chunk_bytes, arena_bytes = arena_geometry(cfg.dram_bytes, cfg.chunk_bytes)
        if arena_bytes < cfg.dram_bytes:
            log.warning("dram_bytes %s is not a whole number of %s chunks: the DRAM tier uses "
                        "and reserves %s (%d chunks); set --dram-bytes to a multiple of "
                        "--chunk-bytes (or a smaller --chunk-bytes) to use all of it",
                        format_bytes(cfg.dram_bytes), format_bytes(chunk_bytes),
                        format_bytes(arena_bytes), arena_bytes // chunk_bytes)
        try:
            self.arena = Arena.create(arena_bytes, Path(cfg.shm_dir) if cfg.shm_dir else None,
                                      prepare_later=True)
            self.arena.reserve(HEADER_BYTES, chunk_bytes)
        except ArenaError as exc:     # the arena does not fit where it was asked to live
            # The arena's message says what failed; this adds, once, what to change.
            raise ConfigError(f"dram_bytes: {exc}; lower --dram-bytes, or enlarge /dev/shm "
                              "(or the filesystem --shm-dir names)") from None
        except OSError as exc:
            raise _unusable_path("shm_dir", cfg.shm_dir, exc) from None
        self.generations = slotgen.SlotGenerations.create(self.arena.path, self.arena.uuid,
                                                          self.arena.size_bytes)
        # With an HBM tier the snapshot publishes tier HBM too (the block table mirrors the
        # tier's copies as it reports them), so a GPU engine keeps its same-host lookups and
        # lease-free DRAM reads.
        self.snapshot = shmindex.ShmIndex.create(
            self.arena.path, self.arena.uuid,
            shmindex.buckets_for(cfg.dram_bytes + (cfg.ssd_bytes or 0)),
            remote=bool(cfg.remote), hbm=bool(cfg.hbm_bytes))
        log.info("index snapshot for same-host lookups: %s (%d buckets, %d blocks before "
                 "lookups fall back to gRPC)", self.snapshot.path, self.snapshot.buckets,
                 self.snapshot.capacity_blocks)

    def _compose(self, loop: asyncio.AbstractEventLoop) -> None:
        """The composition root: each part gets its collaborators through its constructor, in
        dependency order (docs/architecture.md, "Composition root")."""
        cfg = self.cfg
        copies = TierSet()    # every tier a block's copy can be in: the table frees through it
        events = open_event_log(cfg) if cfg.kv_events_endpoint else None
        table = BlockTable(mirror=self.snapshot, on_free=copies.forget,
                           generations=self.generations, events=events)
        if events is not None:     # first, so AllBlocksCleared precedes every stored block
            self.events = start_publisher(
                cfg, events, lambda: table.snapshot(self.hbm.copies() if self.hbm else ()),
                loop)
        evict = eviction_policy(DEFAULT_EVICTION)   # one order for every tier
        dram = DRAMTier(self.arena, table, cfg.chunk_bytes, self.generations, eviction=evict)
        copies.add(dram)
        self.preparer = ArenaPreparer(
            self.arena, dram.slabs.chunk_bytes,
            lambda end: loop.call_soon_threadsafe(dram.mark_ready, end),
            limit_bps=cfg.dram_prepare_limit)
        if cfg.hbm_bytes:
            self.hbm = open_hbm_tier(cfg, table, dram, evict)
            copies.add(self.hbm)
        ssd = open_ssd_tier(cfg, table, dram, self.hbm, evict) if cfg.ssd_bytes else None
        if ssd is not None:
            copies.add(ssd)
        self.store = BlockStore(
            table, dram, ssd=ssd, hbm=self.hbm, max_batch_blocks=cfg.max_batch_blocks,
            lease_timeout_s=cfg.lease_timeout_s, allocation_timeout_s=cfg.allocation_timeout_s,
            quarantine_timeout_s=cfg.quarantine_timeout_s)
        self.ssd = ssd     # its index loads in the background once the socket answers
        self.remote = open_remote(cfg, self.store) if cfg.remote else None
        self.prefetcher = Prefetcher(self.store, cfg.prefetch_concurrency, cfg.prefetch_grace_s,
                                     cfg.max_pending_prefetches,
                                     max_session_bytes=cfg.prefetch_bytes_per_client)
        # The get and put paths, and who hears of every get's hits and every commit's blocks
        # (once each): the prefetcher ends the prefetches a get read; the SSD and remote write
        # policies write what is read (write_through_selective) or committed.
        hits = [o for o in (self.prefetcher, ssd, self.remote) if o is not None]
        commits = [self.remote] if self.remote is not None else []
        self.reads = ReadPath(self.store, ssd=ssd, remote=self.remote,
                              prefetcher=self.prefetcher, observers=hits,
                              dram_read_bps=measure_memcpy_bps())
        self.writes = WritePath(self.store, ssd=ssd, remote=self.remote, observers=commits)

    def _build_server(self, tokens: TokenTable) -> None:
        """Metrics, the access policy, and the gRPC server with the servicer, health checking
        and reflection (not bound yet)."""
        cfg = self.cfg
        opts = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        stats = functools.partial(stats_message, self.store, self.prefetcher, self.remote,
                                  self.events)
        self.metrics = Metrics(self.store, base=stats,
                               history_samples=max(1, round(cfg.metrics_history_s /
                                                            METRICS_SAMPLE_S)))
        self.access = AccessPolicy(
            self.store, self.metrics, tokens,
            Limits(cfg.max_inflight_requests_per_client, cfg.inflight_bytes_per_client),
            socket_requires_token=cfg.socket_requires_token)
        self.server = grpc.aio.server(options=opts, interceptors=[self.access])
        servicer = KVStoreServicer(self.store, self.reads, self.writes, cfg.max_message_bytes,
                                   self.stopping, self.metrics, stats=stats,
                                   index_path=str(self.snapshot.path) if self.snapshot else "")
        pb_grpc.add_KVStoreServicer_to_server(servicer, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, reflection.SERVICE_NAME, health.SERVICE_NAME), self.server)

    def _bind(self, sock: Path, tls) -> str:
        """Bind the unix socket (owner-only until :meth:`_serve` sets its mode) and the TCP
        listener if any; returns the TCP address bound, or ""."""
        cfg = self.cfg
        # gRPC binds a private name that is renamed into place: gRPC unlinks the path it bound
        # when the server stops, and that must never be a socket another daemon has since put
        # at the configured path. _remove_own_socket removes ours.
        bound = sock.with_name(f".kvstore-{os.getpid()}.sock")
        bound.unlink(missing_ok=True)
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others can connect
        try:
            self.server.add_insecure_port(f"unix:{bound}")
        finally:
            os.umask(old_umask)
        os.rename(bound, sock)
        self._socket_id = _file_identity(sock)
        tcp = ""
        if cfg.listen:
            try:
                port = (self.server.add_secure_port(cfg.listen, tls) if tls
                        else self.server.add_insecure_port(cfg.listen))
            except RuntimeError as exc:
                raise DaemonError(f"listen {cfg.listen}: cannot bind ({exc})") from None
            tcp = f"{cfg.listen.rsplit(':', 1)[0]}:{port}"
            if tls is None and not _is_loopback(cfg.listen):
                log.warning("TCP listener %s has no TLS: bearer tokens cross the network in "
                            "clear text (set tls_cert_file and tls_key_file)", tcp)
        return tcp

    async def _serve(self, sock: Path, sock_mode: int, sock_gid: int | None) -> None:
        """Start answering: the server, arena preparation, the socket's mode, the metrics
        endpoint, SERVING, the SSD index load and the periodic loops."""
        cfg = self.cfg
        await self.server.start()
        if not self.preparer.started_at:
            # Only now: under memory pressure preparing (page reclaim) would slow the start.
            self.preparer.start()
        if sock_gid is not None:
            os.chown(sock, -1, sock_gid)
        os.chmod(sock, sock_mode)
        self._socket_id = _file_identity(sock)   # chmod changed its ctime
        self.metrics_server = None
        if cfg.metrics_port:
            self.metrics_server = MetricsServer(self.metrics.snapshot, cfg.metrics_host,
                                                cfg.metrics_port, self.metrics.history.since)
            try:
                await self.metrics_server.start()
            except OSError as exc:
                raise DaemonError(f"metrics_port {cfg.metrics_host}:{cfg.metrics_port}: "
                                  f"{exc.strerror or exc}") from None
        # SERVING as soon as the socket answers: DRAM is usable while the SSD index loads
        # (SSD capacity reads 0 ready until then; the log says when it is loaded).
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._started = True
        if self.ssd is not None:
            self.ssd.start_recovery(self.store.register_namespace, cfg.ssd_recovery_batch,
                                    cfg.ssd_recovery_limit)
        self._expirer = asyncio.create_task(self._expire_loop())
        self._sampler = asyncio.create_task(self._sample_loop())
        self._beater = (asyncio.create_task(self._beat_loop())
                        if self.snapshot is not None else None)

    def _log_started(self, sock: Path, sock_mode: int, tcp: str, tls, tokens: TokenTable) -> None:
        """One line for the listener, the access rules and each tier."""
        cfg = self.cfg
        log.info("kvstore %s listening on unix:%s (mode %04o)%s; %s event loop", __version__,
                 sock, sock_mode, f" and tcp:{tcp}{' (TLS)' if tls else ''}" if tcp else "",
                 type(asyncio.get_running_loop()).__module__.split(".")[0])
        log.info("access: %d bearer tokens; socket %s a token; shared arena for the socket's "
                 "owner%s; per client at most %d puts/gets and %s in flight", len(tokens),
                 "requires" if cfg.socket_requires_token else "does not require",
                 f" and tenants {', '.join(cfg.arena_tenants)}" if cfg.arena_tenants else " only",
                 cfg.max_inflight_requests_per_client,
                 format_bytes(cfg.inflight_bytes_per_client))
        log.info("DRAM tier: %s shared arena at %s (chunks of %s; %s ready, the rest is "
                 "prepared in the background)",
                 format_bytes(self.store.dram.capacity_bytes()), self.arena.path,
                 format_bytes(self.store.dram.slabs.chunk_bytes),
                 format_bytes(self.store.dram.slabs.ready_bytes))
        if self.ssd is not None:
            t = self.ssd
            log.info("SSD tier: %s in %s (%d segments of %s, %s I/O, %d threads, %s; "
                     "loading the index in the background)", format_bytes(t.slabs.capacity_bytes),
                     t.slabs.directory, t.slabs.n_segments, format_bytes(t.slabs.segment_bytes),
                     "O_DIRECT" if t.slabs.direct else "buffered", t.slabs.io_threads,
                     t.policy.name)
        else:
            log.info("SSD tier: off (set --ssd-bytes)")
        if self.hbm is not None:
            h = self.hbm
            route = ""
            if self.ssd is not None:
                route = ("; SSD blocks are read straight into HBM" if self.ssd.direct_to_hbm()
                         else "; SSD blocks reach HBM through DRAM")
            log.info("HBM tier: %s %s pool on %s%s", format_bytes(h.slabs.capacity_bytes),
                     h.pool.backend, h.pool.device, route)
        else:
            log.info("HBM tier: off (set --hbm-bytes on a CUDA host)")
        if self.remote is not None:
            r = self.remote
            log.info("remote tier: %s (%s; lookups wait at most %gs, gets %gs; queue %d blocks)",
                     r.url, r.policy, r.deadline_s, r.read_deadline_s, r.queue_blocks)
        else:
            log.info("remote tier: off (set --remote mooncake://MASTER:PORT or redis://H:P,...)")

    def reload_tokens(self) -> None:
        """SIGHUP: re-read the tokens file; the next call of every client is checked against it."""
        if self.access is None:
            return
        try:
            tokens = TokenTable.from_config(self.cfg.tokens_file, self.cfg.auth_token,
                                            self.cfg.arena_tenants)
        except ConfigError as exc:
            log.error("SIGHUP: keeping the %d tokens in force: %s", len(self.access.tokens), exc)
            return
        self.access.replace_tokens(tokens)
        log.info("SIGHUP: reloaded %d bearer tokens from %s", len(tokens),
                 self.cfg.tokens_file or "auth_token")

    async def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            r = self.health.set(name, status)
            if asyncio.iscoroutine(r):
                await r

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(EXPIRE_INTERVAL_S)
            try:
                self.store.expire()
                self.prefetcher.expire()
            except Exception:
                log.exception("lease expiry failed")

    async def _sample_loop(self) -> None:
        while True:
            try:
                self.metrics.sample()
            except Exception:
                log.exception("metrics sampling failed")
            await asyncio.sleep(METRICS_SAMPLE_S)

    async def _beat_loop(self) -> None:
        """Keep the index snapshot's heartbeat fresh: readers trust it only while we answer."""
        while self.snapshot is not None:
            self.snapshot.beat()
            await asyncio.sleep(shmindex.HEARTBEAT_S)

    async def wait(self) -> None:
        await self.stopping.wait()

    async def stop(self) -> None:
        """Shut down, or after a failed start() release what it had opened (quietly)."""
        grace_s = self.cfg.shutdown_grace_s or SHUTDOWN_GRACE_S
        t_stop = time.monotonic()
        if self._started:
            log.info("shutting down: draining in-flight calls (up to %.1fs)", grace_s)
        self.stopping.set()
        if self.server is not None:
            await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            await self.server.stop(grace_s)
        if getattr(self, "metrics_server", None):
            await self.metrics_server.stop()
        for task in (getattr(self, "_expirer", None), getattr(self, "_sampler", None),
                     getattr(self, "_beater", None)):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.prefetcher is not None:
            self.prefetcher.close()
        if getattr(self, "remote", None) is not None:
            # before sessions end: engine calls write into slots; bounded by what is left of
            # the grace (a dead engine must not hold the exit)
            left = max(grace_s - (time.monotonic() - t_stop), min(1.0, grace_s))
            if not await self.remote.close(left):
                self.engine_calls_abandoned = True
                # The arena must outlive engine calls that may still write into it: it stays
                # mapped (its file unlinked, so nothing is left in /dev/shm), and run_daemon
                # ends the process without waiting for them.
                if self.arena is not None:
                    Path(self.arena.path).unlink(missing_ok=True)
                    self.arena = None
            self.remote = None
        if self.store is not None:
            for sid in list(self.store.sessions):
                self.store.close_session(sid)
        if self.ssd is not None:
            try:
                await self.ssd.close()
            except OSError:
                log.exception("SSD tier: flushing at shutdown failed")
            if not self._started:     # a failed start removes the SSD files it created
                self.ssd.slabs.discard_created()
            self.ssd = None
        if self.hbm is not None:
            self.hbm.close()
            self.hbm = None
        if self.events is not None:
            self.events.stop()     # after the tiers: their last changes are published
            self.events = None
        if getattr(self, "preparer", None) is not None:
            self.preparer.stop()     # before the mapping goes: it madvises into it
        if self.arena is not None:
            self.arena.close()
        if self.generations is not None:
            self.generations.close()
        if self.snapshot is not None:
            self.snapshot.close()     # sets its closed flag first: mapped clients fall back
        self._remove_own_socket()
        self._release_lock()
        if self._started:
            log.info("stopped")

    def _release_lock(self) -> None:
        """Unlink the socket's lock file and release it (kvstore.core.lockfile)."""
        if self._lock_fd is None:
            return
        lockfile.release(self._lock_fd, lock_path(Path(self.cfg.socket)))
        self._lock_fd = None

    def _remove_own_socket(self) -> None:
        """Unlink the socket only if the file there is still the one this daemon bound."""
        if self._socket_id is None:
            return
        path = Path(self.cfg.socket)
        with contextlib.suppress(FileNotFoundError):
            if _file_identity(path) == self._socket_id:
                path.unlink()
            else:
                log.warning("%s is no longer the socket this daemon bound: leaving it", path)


def open_event_log(cfg: Config):
    """The event log the block table reports tier changes to; ConfigError without the
    ``events`` extra (pyzmq, msgspec)."""
    try:
        import msgspec  # noqa: F401
        import zmq  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"kv_events_endpoint: publishing KV events needs pyzmq and msgspec "
                          f"({exc.name} is missing): pip install 'kvstore-offload[events]'") from None
    from kvstore.events.log import EventLog
    return EventLog(cfg.kv_events_queue, cfg.kv_events_tenants)


def start_publisher(cfg: Config, events, snapshot, loop):
    """Bind the KV-event sockets and start the publisher thread; DaemonError if a socket
    cannot be bound."""
    import zmq
    from kvstore.events.publisher import EventPublisher
    pub = EventPublisher(events, cfg.kv_events_endpoint, cfg.kv_events_replay_endpoint,
                         topic=cfg.kv_events_topic, buffer_batches=cfg.kv_events_buffer_batches,
                         snapshot=snapshot)
    try:
        pub.start(loop)
    except zmq.ZMQError as exc:
        where = " / ".join(e for e in (cfg.kv_events_endpoint, cfg.kv_events_replay_endpoint)
                           if e)
        raise DaemonError(f"kv_events: cannot bind {where} ({exc})") from None
    log.info("KV events: publishing on %s%s%s", cfg.kv_events_endpoint,
             f", replay and snapshots on {cfg.kv_events_replay_endpoint}"
             if cfg.kv_events_replay_endpoint else "",
             f" (tenants {', '.join(cfg.kv_events_tenants)})" if cfg.kv_events_tenants else "")
    return pub


def open_ssd_tier(cfg: Config, table, dram, hbm=None, eviction=None):
    """Open the SSD tier's files and build it (recovery is the caller's, once the store that
    registers recovered namespaces exists); raises DaemonError or ConfigError with a clear
    message."""
    from kvstore.policies.write import write_policy
    from kvstore.tiers.ssd.catalog import SSDCatalog
    from kvstore.tiers.ssd.files import SSDSpaceError, SlabFiles
    from kvstore.tiers.ssd.format import SSDFormatError
    from kvstore.tiers.ssd.journal import Journal
    from kvstore.tiers.ssd.space import SSDSpace
    from kvstore.tiers.ssd.tier import SSDTier

    limiter = None
    if cfg.ssd_read_limit:
        from kvstore.tiers.ssd.ratelimit import TokenBucket
        limiter = TokenBucket(cfg.ssd_read_limit)
        log.info("SSD reads capped at %s/s (ssd_read_limit)",
                 format_bytes(cfg.ssd_read_limit))
    files = SlabFiles(Path(cfg.ssd_dir).expanduser(), cfg.ssd_bytes, cfg.ssd_segment_bytes,
                      io_threads=cfg.ssd_io_threads, read_limiter=limiter)
    try:
        files.open()
    except SSDFormatError as exc:     # data in the way (another format, another daemon's): 1
        files.close()
        raise DaemonError(f"SSD tier: {exc}") from None
    except SSDSpaceError as exc:      # the size asked for does not fit there: 2
        files.close()
        raise ConfigError(f"ssd_bytes: cannot preallocate {format_bytes(files.capacity_bytes)} "
                          f"for the SSD tier: {exc.strerror}") from None
    except OSError as exc:
        files.close()
        raise _unusable_path("ssd_dir", cfg.ssd_dir, exc) from None
    catalog = SSDCatalog(table, files, Journal(files.directory / "journal", files.pool))
    space = SSDSpace(table, files, catalog, eviction=eviction)
    return SSDTier(table, dram, files, catalog, space,
                   write_policy(cfg.ssd_write_policy, cfg.ssd_write_hits),
                   hbm=hbm, gds=open_gds(files, hbm), io_uring=cfg.ssd_io_uring)


def open_gds(files, hbm):
    """A GPUDirect Storage reader over the SSD files for a CUDA HBM pool (None otherwise, or
    when kvikio is missing or unusable: then SSD blocks reach HBM through DRAM)."""
    if hbm is None or hbm.pool.backend != "cuda":
        return None
    from kvstore.tiers.ssd import gds
    if not gds.available():
        log.info("kvikio not installed (the gds extra): SSD blocks reach HBM through DRAM")
        return None
    try:
        return gds.KvikioSlotIO(files)
    except Exception as exc:     # kvikio present but unusable: the bounce path works
        log.warning("GPUDirect Storage unavailable (%s): SSD blocks reach HBM through "
                    "DRAM", exc)
        return None


def open_hbm_tier(cfg: Config, table, dram, eviction=None):
    """Create the HBM pool and its tier; raises ConfigError or DaemonError with a clear
    message."""
    from kvstore.tiers.hbm import HBMTier, HBMUnavailable, open_pool

    try:
        pool = open_pool(cfg.hbm_bytes, cfg.hbm_device,
                         Path(cfg.shm_dir) if cfg.shm_dir else None)
    except HBMUnavailable as exc:     # its message says which of hbm_* to change
        raise ConfigError(f"HBM tier: {exc}") from None
    except OSError as exc:
        raise DaemonError(f"HBM tier: {exc}") from None
    if pool.backend == "cuda":
        pool.pin_host(dram.arena)    # DRAM -> HBM prefetch copies as DMA
    return HBMTier(pool, table, dram, cfg.chunk_bytes, eviction)


def open_remote(cfg: Config, store: BlockStore):
    """The cluster tier; raises DaemonError when its engine client is missing. The engine
    itself may be down: the tier connects on first use and degrades to local until then."""
    from kvstore.store.fills import StoreFillSlots
    from kvstore.tiers.remote import RemoteError, open_remote_tier

    try:
        # the tier gets the slots its fills land in, never the store itself
        return open_remote_tier(cfg, StoreFillSlots(store))
    except RemoteError as exc:
        raise DaemonError(f"remote tier {cfg.remote}: {exc}") from None


async def run_daemon(cfg: Config) -> None:
    daemon = Daemon(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stopping.set)
    loop.add_signal_handler(signal.SIGHUP, daemon.reload_tokens)
    try:
        await daemon.start()
        await daemon.wait()
    finally:
        await daemon.stop()
        if daemon.engine_calls_abandoned:
            # Everything of ours is closed; what is left is an engine client stuck in calls
            # to an engine that is gone (its destructor would retry them again at exit).
            logging.shutdown()
            os._exit(0)


def _is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
