"""The kvstore client SDK.

    client = KVClient()                                   # default socket, or socket=/address=
    ns = client.namespace("llama-3-8b", KVLayout(32, 8, 128, block_tokens=16))
    keys = ns.block_keys(token_ids)                       # one 16-byte key per full block
    ns.lookup(keys).num_cached                            # longest cached prefix, in blocks
    ns.put(keys, kv).result()                             # kv: [blocks, *layout.block_shape]
    kv = ns.get(keys).result()                            # the longest stored prefix of keys
    ns.delete(keys); client.stats()

put/get return concurrent.futures.Future: the copy runs on the SDK's I/O threads so the caller's
compute goes on. The caller must not modify a tensor it passed to put until its future is done.
Same-host clients copy through the shared arena; others (TCP, or no access to the arena file)
stream bytes over gRPC with the same semantics. Every error is a kvstore.client.errors class;
the runtime adapters turn any of them into "recompute".
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait

import grpc

from kvstore.core import memorder, shmindex
from kvstore.client.datapath import DataPath, open_datapath
from kvstore.client.errors import InvalidArgument, KVStoreError, Unavailable, from_rpc_error
from kvstore.client.namespace import Namespace, PendingPuts
from kvstore.client.heldreleases import HeldReleases
from kvstore.client.readreports import ReadReports
from kvstore.client.stats import Stats
from kvstore.core.paths import default_socket
from kvstore.core.layout import KVLayout
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

log = logging.getLogger("kvstore.client")

_MSG_LIMIT = 256 << 20


def unreachable_message(target: str, timeout_s: float) -> str:
    """What a client that found no daemon at ``target`` (a gRPC target: unix:PATH or
    host:port) says, in an operator's words rather than gRPC's."""
    if target.startswith("unix:"):
        path = target.removeprefix("unix:")
        why = "no such file" if not os.path.exists(path) else \
            f"no daemon answered within {timeout_s:g}s"
        where = f"socket {path}: {why}"
    else:
        where = f"address {target}: no daemon answered within {timeout_s:g}s"
    return f"cannot reach the daemon: is the daemon running? ({where})"


class _Session:
    """The OpenSession stream, kept open by a background thread for the client's lifetime."""

    def __init__(self, stub, client_name: str, timeout_s: float):
        self.ready = threading.Event()
        self.ended = threading.Event()
        self.event: pb.SessionEvent | None = None
        self.error: BaseException | None = None
        self._call = stub.OpenSession(pb.OpenSessionRequest(client_name=client_name,
                                                            pid=os.getpid()))
        self._thread = threading.Thread(target=self._run, name="kvstore-session", daemon=True)
        self._thread.start()
        if not self.ready.wait(timeout_s):
            self._call.cancel()
            raise Unavailable(f"daemon did not open a session within {timeout_s:g}s")
        if self.event is None:
            raise self.error if self.error else Unavailable("daemon closed the session")

    def _run(self) -> None:
        try:
            for ev in self._call:
                if self.event is None:
                    self.event = ev
                    self.ready.set()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.error = from_rpc_error(exc)
        finally:
            self.ended.set()
            self.ready.set()

    @property
    def alive(self) -> bool:
        return not self.ended.is_set()

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(timeout=2)


class KVClient:
    """A connection to one kvstore daemon. Thread-safe; reconnects on its own after a restart.

    socket:    Unix socket path (default: the daemon's default socket).
    address:   "host:port" for TCP instead (bytes then travel over gRPC).
    token:     bearer token for a TCP daemon that requires one.
    tls:       connect with TLS (implied by tls_ca_file); tls_ca_file is the PEM of the CA (or the
               self-signed certificate) to trust instead of the system roots; tls_server_name
               overrides the name checked against the certificate.
    timeout_s: deadline of each control call.
    io_threads: threads running puts and gets; copy_threads: threads splitting one large host
               copy (1: copy on the I/O thread alone).
    shared_memory: map the daemon's arena when it is reachable (same host).
    pin_arena: register the mapped arena as pinned memory for GPU DMA (client/cuda.py); None
               (default) pins when this process uses CUDA through torch, False never does.
    use_hbm:   open the daemon's HBM pool when it has one (client/hbm.py): gets into tensors on
               the pool's GPU then read HBM copies device to device. None (default) and True
               open it when this process can; False never does.
    """

    def __init__(self, socket: str | None = None, *, address: str | None = None,
                 token: str | None = None, timeout_s: float = 10.0, io_threads: int = 2,
                 copy_threads: int = 2,
                 shared_memory: bool = True, client_name: str = "", tls: bool = False,
                 tls_ca_file: str | None = None, tls_server_name: str | None = None,
                 pin_arena: bool | None = None, use_hbm: bool | None = None):
        self.target = address if address else f"unix:{socket or default_socket()}"
        self.timeout_s = timeout_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._want_shm = shared_memory
        self._client_name = client_name or f"pid{os.getpid()}"
        self._tls = _tls_credentials(tls, tls_ca_file)
        options = [
            ("grpc.max_receive_message_length", _MSG_LIMIT),
            ("grpc.max_send_message_length", _MSG_LIMIT),
            # A private subchannel pool and a short reconnect backoff: a channel that saw the
            # daemon down must not keep failing fast for up to gRPC's default 120 s backoff
            # after the daemon is back, and a new channel must not inherit another's backoff.
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        self._channel_options = options   # a reconnect opens its channel with these too
        self._new_channel()
        self._lock = threading.Lock()
        self._session: _Session | None = None
        # How block bytes move (client/datapath/): chosen per session from the daemon's grant
        self.datapath: DataPath | None = None
        # The daemon's index snapshot (kvstore/core/shmindex.py): lookups without an RPC
        self.index_snapshot: shmindex.ShmIndex | None = None
        # (snapshot, data path) of one session, replaced as one: lease-free gets
        self._local_pair: tuple | None = None
        # Releases sent without waiting (their copies were proven): close() drains them
        self._releases_lock = threading.Condition()
        self._releases = 0
        # Proven copies' releases, held for this client's next Acquire/Release (ride along)
        self.held_releases = HeldReleases(lambda req: self.call("Release", req))
        self._work: set[Future] = set()      # puts and gets not finished yet, likewise
        self._pending_puts = PendingPuts()
        # Lease-free gets' reads, reported to the daemon off their critical path
        self.read_reports = ReadReports(lambda req: self.call("ReportReads", req),
                                        lambda: getattr(self, "max_batch_blocks", 4096))
        self._pin_arena = pin_arena
        self._use_hbm = use_hbm
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="kvstore-io")
        # Host copies of large batches are split across these threads (see transfer.copy_runs);
        # a separate pool, so an I/O thread waiting on its pieces can never starve them.
        self._copy_pool = ThreadPoolExecutor(copy_threads, thread_name_prefix="kvstore-copy") \
            if copy_threads > 1 else None
        self._namespaces: dict[bytes, Namespace] = {}
        self._closed = False
        self._closing = False
        self._draining = False    # close() is joining: work not started yet is refused
        self.reconnects = 0
        self._connect()

    # -- connection --------------------------------------------------------------------------
    def _new_channel(self) -> None:
        self._channel = _open_channel(self.target, self._channel_options, self._tls)
        self._stub = pb_grpc.KVStoreStub(self._channel)

    def _connect(self) -> None:
        """Open a session. Raises Unavailable "cannot reach the daemon: is the daemon running?
        (socket PATH: why)" when nothing answers (the raw gRPC text only in the debug
        log), or the daemon's own error (e.g. Unauthenticated) when one does."""
        try:
            sess = _Session(self._stub, self._client_name, self.timeout_s) \
                if not self._metadata else self._open_with_metadata()
        except Unavailable as exc:
            log.debug("connecting to %s: %s", self.target, exc)
            # Same class (Timeout stays Timeout: callers classify by it), plainer words.
            err = type(exc)(unreachable_message(self.target, self.timeout_s), exc.reason)
            err.status_code = getattr(exc, "status_code", None)
            raise err from exc
        ev = sess.event
        self._close_datapath()
        self.max_batch_blocks = ev.max_batch_blocks or 4096
        self.max_message_bytes = min(ev.max_message_bytes or (4 << 20), _MSG_LIMIT)
        self.datapath = open_datapath(self, ev, shared_memory=self._want_shm,
                                      pin_arena=self._pin_arena, use_hbm=self._use_hbm,
                                      copy_pool=self._copy_pool)
        unsound = memorder.lock_free_reads_unsound()
        if self.datapath.shared_memory and ev.arena.index_path and unsound:
            log.info("no index snapshot (%s): lookups go over gRPC", unsound)
        elif self.datapath.shared_memory and ev.arena.index_path:
            try:
                self.index_snapshot = shmindex.ShmIndex.attach(ev.arena.index_path,
                                                               ev.arena.uuid)
            except (shmindex.ShmIndexError, OSError) as exc:
                log.info("no index snapshot (%s): lookups go over gRPC", exc)
        if self.index_snapshot is not None and self.datapath.generations is not None:
            self._local_pair = (self.index_snapshot, self.datapath)
        self._session = sess

    def _open_with_metadata(self) -> _Session:
        stub = self._stub
        md = self._metadata

        class _Stub:  # pass the token on the session stream too
            def OpenSession(self, req):
                return stub.OpenSession(req, metadata=md)
        return _Session(_Stub(), self._client_name, self.timeout_s)

    def _ensure_session(self) -> _Session:
        if self._closed:
            raise Unavailable("client is closed")
        s = self._session
        if s is not None and s.alive:
            return s
        with self._lock:
            if self._session is None or not self._session.alive:
                log.info("session to %s ended; reconnecting", self.target)
                self._channel.close()  # its backoff state could refuse a daemon that is back
                self._new_channel()
                self._connect()
                self.reconnects += 1
                for ns in self._namespaces.values():
                    ns._registered = False
            return self._session

    @property
    def session_id(self) -> int:
        return self._ensure_session().event.session_id

    def local_index(self) -> "shmindex.ShmIndex | None":
        """The index snapshot to answer lookups from, or None (no snapshot, or the session
        ended: the daemon may have restarted, so the next RPC reconnects and re-maps)."""
        s = self._session
        if s is None or not s.alive:
            return None
        return self.index_snapshot

    def local_reads(self) -> "tuple[shmindex.ShmIndex, DataPath] | None":
        """(index snapshot, data path) of the current session, for a lease-free get: the
        snapshot's offsets and generations name slots of that path's arena only (another
        daemon's arena may hold other bytes at the same offset and generation). None: no
        snapshot or no slot generations, or the session ended."""
        s = self._session
        if s is None or not s.alive:
            return None
        return self._local_pair

    @property
    def arena(self):
        """The daemon's arena mapped in this process (kvstore.core.arena.Arena), or None."""
        return self.datapath.arena if self.datapath is not None else None

    @property
    def shared_memory(self) -> bool:
        """True when block bytes move through the mapped arena (same host)."""
        return self.datapath is not None and self.datapath.shared_memory

    def call(self, method: str, request, timeout_s: float | None = None):
        """One unary RPC with the client's deadline (or ``timeout_s``); gRPC errors become
        KVStoreError classes."""
        try:
            return getattr(self._stub, method)(request, timeout=timeout_s or self.timeout_s,
                                               metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def stream(self, method: str, request, timeout_s: float | None = None):
        """Start one server-streaming RPC with the client's deadline (or ``timeout_s``): the
        gRPC call (iterate it; it raises grpc.RpcError, cancel() ends it)."""
        return getattr(self._stub, method)(request, timeout=timeout_s or self.timeout_s,
                                           metadata=self._metadata)

    # -- API ---------------------------------------------------------------------------------
    def namespace(self, model_id: str, layout: KVLayout, tenant: str = "") -> "Namespace":
        ns = Namespace(self, model_id, layout, tenant)
        ns._register()
        self._namespaces[ns.namespace_id] = ns
        return ns

    def stats(self) -> Stats:
        """The daemon's statistics (client/stats.py): print() shows a short table; .proto is
        the kvstore.v1.Stats message. This client's own gets so far are counted in it: its
        lease-free reads' reports and its releases sent without waiting or held for its next call
        (which end a leased get's latency sample) are sent and waited for first, at most
        timeout_s."""
        self._ensure_session()
        self.read_reports.flush(self.timeout_s)
        self.held_releases.flush(self.timeout_s)
        with self._releases_lock:
            self._releases_lock.wait_for(lambda: self._releases == 0, self.timeout_s)
        return Stats.from_proto(self.call("GetStats", pb.GetStatsRequest()))

    def watch_stats(self, interval_s: float = 1.0):
        """Iterate over Stats snapshots every interval_s until the daemon stops (WatchStats).
        The first one counts this client's gets and lookups so far, as stats() does."""
        self._ensure_session()
        self.read_reports.flush(self.timeout_s)
        try:
            for msg in self._stub.WatchStats(pb.WatchStatsRequest(interval_s=interval_s),
                                             metadata=self._metadata):
                yield Stats.from_proto(msg)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def report_fallbacks(self, count: int = 1, blocks: int = 0, reason: str = "",
                         namespace_id: bytes = b"") -> bool:
        """Tell the daemon this client recomputed instead of loading; never raises (the cache
        is already failing this client, and reporting must not make that worse). Returns
        whether the daemon took the report (False: the caller may report it again later)."""
        try:
            self.call("ReportFallbacks", pb.ReportFallbacksRequest(
                namespace_id=namespace_id, count=count, blocks=blocks, reason=reason[:200]))
            return True
        except KVStoreError as exc:
            log.debug("could not report %d fallbacks: %s", count, exc)
            return False

    def submit(self, fn, *args) -> Future:
        fut = self._pool.submit(self._run_work, fn, args)
        with self._releases_lock:
            self._work.add(fut)
        fut.add_done_callback(self._work_done)
        return fut

    def _run_work(self, fn, args):
        if self._draining:
            # close() is joining the threads: what had not started fails as a closed client's
            # call does (a KVStoreError: the caller recomputes), without any RPC
            raise Unavailable("client closed before this operation started")
        return fn(*args)

    def _work_done(self, fut) -> None:
        with self._releases_lock:
            self._work.discard(fut)

    def _release_async(self, request) -> None:
        """Send a Release without waiting for its answer; close() waits for it. A plain
        release (no HBM fill to publish) is held for this client's next call instead
        (client/heldreleases.py)."""
        if not request.hbm_filled:
            self.held_releases.hold(request.session_id, request.lease_id)
            return
        fut = self._stub.Release.future(request, timeout=self.timeout_s, metadata=self._metadata)
        with self._releases_lock:
            self._releases += 1
        fut.add_done_callback(self._release_done)

    def _release_done(self, fut) -> None:
        with self._releases_lock:
            self._releases -= 1
            self._releases_lock.notify_all()
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            return
        code = exc.code() if isinstance(exc, grpc.Call) else None
        if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
            # the lease had ended (expiry, session lost): the copy was proven by its
            # generations all the same, so nothing was lost
            log.debug("asynchronous lease release: %s", exc.details())
        else:
            log.warning("asynchronous lease release failed: %s", exc)

    def close(self, timeout_s: float | None = None) -> None:
        """Finish this client's puts and gets, wait for their releases and read reports (all
        bounded by ``timeout_s``, default the client's timeout_s), then end the session and
        the channel.
        Leases still open then end with the session. Puts and gets not started by the
        deadline fail with Unavailable; those running are always joined before the session ends
        (each is bounded by the client's timeouts), so no copy of this client's threads
        can land in an arena slot after the daemon took it back. Copies into views the
        caller holds (BlockAllocation.views) are the caller's: the daemon keeps such slots
        quarantined while this process maps the arena."""
        if self._closed or self._closing:
            return
        self._closing = True      # queued puts and gets still run: _closed comes after them
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        with self._releases_lock:
            work = list(self._work)
        futures_wait(work, timeout=max(0.0, deadline - time.monotonic()))
        # Joining from one of the pool's own threads (a done callback that closes) would wait
        # for itself: there, the other threads are left running, and the daemon's quarantine
        # covers what they write.
        own = threading.current_thread().name.startswith(("kvstore-io", "kvstore-copy"))
        self._draining = True
        self._pool.shutdown(wait=not own)
        if self._copy_pool is not None:
            self._copy_pool.shutdown(wait=not own)
        self.held_releases.close(max(0.0, deadline - time.monotonic()))
        with self._releases_lock:
            self._releases_lock.wait_for(lambda: self._releases == 0,
                                         max(0.0, deadline - time.monotonic()))
        self.read_reports.close(max(0.0, deadline - time.monotonic()))
        self._closed = True
        if self._session is not None:
            self._session.close()
        self._channel.close()
        self._close_datapath()

    def _close_datapath(self) -> None:
        self._local_pair = None
        if self.index_snapshot is not None:
            self.index_snapshot.close()
            self.index_snapshot = None
        if self.datapath is not None:
            self.datapath.close()
            self.datapath = None

    def __enter__(self) -> "KVClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tls_credentials(tls: bool, ca_file: str | None):
    """Channel credentials for TLS (None: plaintext). ca_file replaces the system roots."""
    if not (tls or ca_file):
        return None
    roots = None
    if ca_file:
        try:
            with open(ca_file, "rb") as f:
                roots = f.read()
        except OSError as exc:
            raise InvalidArgument(f"tls_ca_file {ca_file}: {exc.strerror}") from None
    return grpc.ssl_channel_credentials(root_certificates=roots)


def _open_channel(target: str, options: list, tls_credentials) -> grpc.Channel:
    if tls_credentials is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, tls_credentials, options=options)
