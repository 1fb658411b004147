"""The read and write paths' in-process tests share this: real tier objects (a DRAM arena in
/dev/shm, SSD slab files in a temp dir, the cluster tier over an in-memory engine) wired as the
daemon's composition root wires them, a fake clock for the store's leases, no daemon and no
gRPC (the way vLLM tests its offload manager)."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from kvstore.core.arena import Arena
from kvstore.core.keys import chain_keys, pack_keys
from kvstore.core.layout import KVLayout
from kvstore.store.blockstore import BlockStore, TierSet
from kvstore.store.reads import ReadPath
from kvstore.store.table import BlockTable
from kvstore.store.writes import WritePath
from kvstore.tiers.dram import DRAMTier
from kvstore.tiers.remote.base import RemoteBackend
from kvstore.tiers.remote.codec import encode_header, remote_key

LAYOUT = KVLayout(1, 1, 64, 16, "uint8")     # 2 KiB blocks in 4 KiB slots
BB = LAYOUT.block_bytes
ARENA_BYTES = 1 << 20                        # 4 chunks of 256 KiB: 256 slots
CHUNK_BYTES = 256 << 10
LEASE_S = 10.0
assert LAYOUT.slot_bytes == 4096


class Clock:
    """The store's clock: leases and allocations expire when a test says so."""

    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Recorder:
    """An observer that remembers each call (the paths' observer protocols)."""

    def __init__(self):
        self.hits: list[list[int]] = []
        self.commits: list[list[int]] = []

    def on_hits(self, bids: list[int]) -> None:
        self.hits.append(list(bids))

    def on_commit(self, bids: list[int]) -> None:
        self.commits.append(list(bids))


class MemoryEngine(RemoteBackend):
    """A distributed engine held in a dict (Mooncake's or Redis's contract,
    kvstore.tiers.remote.base). ``stall``: while set, ``exists`` hangs (a slow engine) until
    ``release`` is set."""

    name = "memory"

    def __init__(self):
        self.values: dict[str, tuple[bytes, bytes]] = {}
        self.stall = threading.Event()
        self.release = threading.Event()
        self.buf: memoryview | None = None
        self.exists_calls = 0

    def attach(self, arena_buffer) -> None:
        self.buf = arena_buffer

    def exists(self, keys):
        self.exists_calls += 1
        if self.stall.is_set():
            self.release.wait(10)
        return [k in self.values for k in keys]

    def put(self, keys, headers, offsets, sizes):
        for k, h, o, n in zip(keys, headers, offsets, sizes):
            self.values[k] = (bytes(h), bytes(self.buf[o:o + n]))
        return [True] * len(keys)

    def get_into(self, keys, offsets, sizes):
        out = []
        for k, o, n in zip(keys, offsets, sizes):
            v = self.values.get(k)
            if v is None:
                out.append(None)
                continue
            self.buf[o:o + n] = v[1]
            out.append(v[0])
        return out

    def remove(self, keys) -> None:
        for k in keys:
            self.values.pop(k, None)

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        self.release.set()

    def hold(self, namespace_id: bytes, key: bytes, data: bytes) -> None:
        """Another host stored this block."""
        self.values[remote_key(namespace_id, key)] = (encode_header(key, namespace_id, data),
                                                      data)


@dataclass
class Paths:
    arena: Arena
    store: BlockStore
    reads: ReadPath
    writes: WritePath
    clock: Clock
    seen: Recorder
    ssd: object = None
    remote: object = None
    engine: MemoryEngine | None = None
    ns: object = None
    sid: int = 0
    closers: list = field(default_factory=list)

    async def put(self, keys: list[bytes], fill: int) -> int:
        """A client's put through the write path: allocate, copy into the arena, commit."""
        aid, offs = await self.writes.allocate(self.sid, self.ns.namespace_id, pack_keys(keys))
        for i, off in enumerate(offs):
            if off >= 0:
                self.arena.buffer[off:off + BB] = block(fill, i)
        return await self.writes.commit(self.sid, aid)

    def read(self, offsets: list[int]) -> list[bytes]:
        return [bytes(self.arena.buffer[o:o + BB]) for o in offsets]

    async def close(self) -> None:
        for c in reversed(self.closers):
            await c()
        self.arena.close()


def block(fill: int, i: int) -> bytes:
    return bytes([(fill * 31 + i) % 256]) * BB


def chain(n: int, seed: int) -> list[bytes]:
    return chain_keys(bytes([seed]) * 16, list(range(seed * 10000, seed * 10000 + n * 16)), 16)


def build(shm_dir, tmp_path, *, ssd: bool = False, engine: MemoryEngine | None = None,
          remote_deadline_s: float = 0.2, fill_on_lookup: bool = False) -> Paths:
    """The store, its tiers and both paths, wired as kvstore.daemon.server._compose wires them
    (call inside a running event loop: the cluster tier binds to it)."""
    from kvstore.tiers.ssd.catalog import SSDCatalog
    from kvstore.tiers.ssd.files import SlabFiles
    from kvstore.tiers.ssd.journal import Journal
    from kvstore.tiers.ssd.space import SSDSpace
    from kvstore.tiers.ssd.tier import SSDTier

    clock = Clock()
    arena = Arena.create(ARENA_BYTES, shm_dir)
    copies = TierSet()
    table = BlockTable(on_free=copies.forget)
    dram = DRAMTier(arena, table, CHUNK_BYTES)
    copies.add(dram)
    closers = []
    tier = None
    if ssd:
        files = SlabFiles(tmp_path / "ssd", 8 << 20, 4 << 20, io_threads=2)
        files.open()
        catalog = SSDCatalog(table, files, Journal(files.directory / "journal", files.pool))
        tier = SSDTier(table, dram, files, catalog, SSDSpace(table, files, catalog))
        copies.add(tier)
        closers.append(tier.close)
    store = BlockStore(table, dram, ssd=tier, lease_timeout_s=LEASE_S,
                       allocation_timeout_s=LEASE_S, clock=clock)
    if tier is not None:
        tier.recover(store.register_namespace)
    remote = None
    if engine is not None:
        from kvstore.store.fills import StoreFillSlots
        from kvstore.tiers.remote.tier import RemoteTier
        remote = RemoteTier(StoreFillSlots(store), engine, "memory://test", deadline_s=remote_deadline_s,
                            read_deadline_s=2.0, threads=2, fill_on_lookup=fill_on_lookup)
        closers.append(remote.close)
    seen = Recorder()
    hits = [o for o in (tier, remote) if o is not None] + [seen]
    commits = ([remote] if remote is not None else []) + [seen]
    reads = ReadPath(store, ssd=tier, remote=remote, observers=hits, dram_read_bps=10e9)
    writes = WritePath(store, ssd=tier, remote=remote, observers=commits)
    p = Paths(arena, store, reads, writes, clock, seen, tier, remote, engine, closers=closers)
    p.ns = store.register_namespace("m", LAYOUT)
    p.sid = store.open_session("test", 0).session_id
    return p
