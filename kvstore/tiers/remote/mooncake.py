"""Mooncake Store backend: blocks move between the engine and the daemon's arena zero-copy.

The whole DRAM arena is registered with the transfer engine (``register_buffer``), so a put
sends straight from the block's arena slot and a get lands straight in the slot the client will
read (``batch_*_multi_buffers``: the 64-byte header travels as a second buffer, from/into a
small registered per-thread scratch area) — no bounce buffer on either side.

Connection: ``setup`` with P2PHANDSHAKE (no metadata server) and the TCP transport; done lazily
on the first call and again after a failed one, so a daemon starts while its master is down and
joins when it comes up. This daemon contributes ``segment_bytes`` of its memory to the cluster's
pool (0: none, a pure client). Objects are written with ``replica_num`` replicas: with 1, a
block placed in a host's own segment dies with that host — use 2 where hosts come and go.

Mooncake answers per key with negative codes: -704 object not found (a miss), -200 no space
(a put not stored). A read answered with any other code, or with a length other than the
block's, proves nothing about the value: -800 is TRANSFER_FAIL as well as "a value shorter than
the buffers" (right after a replica holder dies, reads of intact objects whose chosen replica
lived there fail with -800 for ~10 s), -600 a value longer than the buffers. Such a key is
settled by the master's record of the object's size: the block's size means the transfer
failed (FAILED: a miss, read again later); another size, and the complete value is read and
answered as the wrong size (corrupt) only once it arrived whole. An error on every key of a
call is a RemoteError.

A batch call waits for its transfers by busy-polling their status in the calling thread
(profiled: half of the daemon's CPU during a 64 MiB read went to that loop — clock_gettime and
getTransferStatus — against a quarter to the transfer worker's socket copy). Where cores are
scarce the loop competes with the very threads that move the bytes: the transfer engine's
workers here and the peer's sender. So a thread that reads (``get_into``; the remote tier runs
fills' reads on threads of their own) lowers its own CPU priority once (nice
``READ_THREAD_NICE``) after the client is up, the engine's worker threads keeping theirs: the
polling then takes only CPU nobody else wants. Measured on a loaded 2-core host: the daemon's
CPU per 64 MiB get fell from 50–60 ms to 30–40 ms and the get from 0.41–0.75x to 0.71–1.16x
the engine's own client in the same runs.
"""
from __future__ import annotations

import logging
import os
import socket
import threading

import numpy as np

from kvstore.tiers.remote.base import LazyClient, RemoteBackend, RemoteError, import_engine
from kvstore.tiers.remote.codec import HEADER_BYTES, ReadStatus

log = logging.getLogger("kvstore.remote.mooncake")

NOT_FOUND = -704
BUFFER_TOO_SMALL = -600    # the value is longer than the buffers
INVALID_SIZE = -800        # (seen for a value shorter than the buffers)
WRONG_SIZE = (BUFFER_TOO_SMALL, INVALID_SIZE)
READ_THREAD_NICE = 10     # the reading thread's nice value (0: leave it)
MAX_BATCH = 1024          # keys per engine call (the tier splits larger batches)


def local_address_towards(host: str, port: int) -> str:
    """The address this host uses to reach ``host`` (the one to advertise to peers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, port))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


class MooncakeBackend(RemoteBackend):
    name = "mooncake"

    def __init__(self, master: str, segment_bytes: int, buffer_bytes: int, replicas: int = 1,
                 local_host: str = ""):
        store = import_engine("mooncake.store", "mooncake", " (and apt-get install libibverbs1)")
        self._store_cls = store.MooncakeDistributedStore
        self.master = master
        host, _, port = master.rpartition(":")
        self.local_host = local_host or local_address_towards(host, int(port))
        # Without it the transfer engine advertises the first interface (eth0), which peers on
        # loopback or another network cannot reach.
        os.environ.setdefault("MC_TCP_BIND_ADDRESS", self.local_host)
        self.segment_bytes = segment_bytes
        self.buffer_bytes = buffer_bytes
        self.config = store.ReplicateConfig()
        self.config.replica_num = replicas
        # Never reset after a failed call: Mooncake clients re-register with a restarted
        # master on their own, and a new client would need a new segment name.
        self._client = LazyClient(self._connect, lambda c: c.close())
        self._arena: memoryview | None = None
        self._arena_addr = 0
        self._tls = threading.local()

    # -- connection ----------------------------------------------------------------------------
    def attach(self, arena_buffer: memoryview) -> None:
        self._arena = arena_buffer
        self._arena_addr = np.frombuffer(arena_buffer, dtype=np.uint8).ctypes.data

    def _connect(self):
        c = self._store_cls()
        rc = c.setup(self.local_host, "P2PHANDSHAKE", self.segment_bytes, self.buffer_bytes,
                     "tcp", "", self.master)
        if rc != 0:
            raise RemoteError(f"Mooncake setup against master {self.master} failed (code {rc})")
        if self._arena is not None:
            rc = c.register_buffer(self._arena_addr, len(self._arena))
            if rc != 0:
                c.close()
                raise RemoteError(f"Mooncake register_buffer of the arena failed (code {rc})")
        log.info("Mooncake: joined master %s as %s (segment %d MiB)", self.master,
                 self.local_host, self.segment_bytes >> 20)
        return c

    def _connected(self):
        return self._client.get()

    def _scratch(self, n: int) -> np.ndarray:
        """This thread's registered header area (n headers)."""
        buf = getattr(self._tls, "buf", None)
        client = self._connected()
        if buf is None or getattr(self._tls, "client", None) is not client:
            buf = np.zeros(MAX_BATCH * HEADER_BYTES, dtype=np.uint8)
            rc = client.register_buffer(buf.ctypes.data, buf.nbytes)
            if rc != 0:
                raise RemoteError(f"Mooncake register_buffer of a header area failed ({rc})")
            self._tls.buf, self._tls.client = buf, client
        if n > MAX_BATCH:
            raise ValueError(f"batch of {n} keys over {MAX_BATCH}")
        return buf

    @staticmethod
    def _all_failed(codes: list[int], ok) -> bool:
        return bool(codes) and not any(ok(c) for c in codes)

    # -- data ----------------------------------------------------------------------------------
    def exists(self, keys: list[str]) -> list[bool]:
        codes = self._connected().batch_is_exist(keys)
        if self._all_failed(codes, lambda c: c >= 0):
            raise RemoteError(f"Mooncake batch_is_exist failed (code {codes[0]})")
        return [c == 1 for c in codes]

    def put(self, keys, headers, offsets, sizes) -> list[bool]:
        client = self._connected()
        scratch = self._scratch(len(keys))
        base = scratch.ctypes.data
        for i, h in enumerate(headers):
            scratch[i * HEADER_BYTES:(i + 1) * HEADER_BYTES] = np.frombuffer(h, dtype=np.uint8)
        ptrs = [[base + i * HEADER_BYTES, self._arena_addr + off] for i, off in enumerate(offsets)]
        lens = [[HEADER_BYTES, n] for n in sizes]
        codes = client.batch_put_from_multi_buffers(keys, ptrs, lens, self.config)
        if self._all_failed(codes, lambda c: c == 0 or c == -200):
            raise RemoteError(f"Mooncake batch_put failed (code {codes[0]})")
        return [c == 0 for c in codes]

    def _lower_read_priority(self) -> None:
        """Once per reading thread, after the client is connected: the engine's worker threads
        are made by the thread that connects and inherit its priority, so they keep theirs."""
        if READ_THREAD_NICE <= 0 or getattr(self._tls, "niced", False):
            return
        self._tls.niced = True
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                           max(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()),
                               READ_THREAD_NICE))
        except OSError as exc:       # not permitted (a sandbox): only slower on a busy host
            log.debug("Mooncake: could not lower a read thread's priority: %s", exc)

    def get_into(self, keys, offsets, sizes) -> list[bytes | None]:
        client = self._connected()
        self._lower_read_priority()
        scratch = self._scratch(len(keys))
        base = scratch.ctypes.data
        ptrs = [[base + i * HEADER_BYTES, self._arena_addr + off] for i, off in enumerate(offsets)]
        lens = [[HEADER_BYTES, n] for n in sizes]
        codes = client.batch_get_into_multi_buffers(keys, ptrs, lens)
        if self._all_failed(codes, lambda c: c >= 0 or c == NOT_FOUND or c in WRONG_SIZE):
            raise RemoteError(f"Mooncake batch_get failed (code {codes[0]})")
        out: list = []
        for i, (c, n) in enumerate(zip(codes, sizes)):
            if c == HEADER_BYTES + n:
                out.append(scratch[i * HEADER_BYTES:(i + 1) * HEADER_BYTES].tobytes())
            elif c == NOT_FOUND:
                out.append(None)
            else:
                out.append(self._settle(client, keys[i], HEADER_BYTES + n, c))
        return out

    @staticmethod
    def _settle(client, key: str, want: int, code: int):
        """A read that did not deliver ``want`` bytes: None (gone), b"" (the complete value
        was read and has another length: corrupt) or FAILED (nothing proven: a miss)."""
        size = client.get_size(key)
        if size == NOT_FOUND:
            return None
        if size < 0 or size == want:
            # the object has the block's size: the transfer failed, not the value
            log.debug("Mooncake: read of %s failed (code %d); object size %d", key[:40], code,
                      size)
            return ReadStatus.FAILED
        value = client.get(key)       # the whole value: judged only once it arrived whole
        if len(value) != size:
            return ReadStatus.FAILED
        return b""

    def remove(self, keys: list[str]) -> None:
        self._connected().batch_remove(keys, True)

    def ping(self) -> bool:
        return self._connected().health_check() == 0

    def close(self) -> None:
        self._client.close()
