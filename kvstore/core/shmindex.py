"""A read-only snapshot of the block index in shared memory: same-host lookups without an RPC.

The daemon (the only writer) mirrors every committed block into an open-addressing table in a
shared-memory file next to the arena (``<arena>.index``); trusted same-host clients map it
read-only and answer ``Namespace.lookup`` themselves (client/namespace.py), and read DRAM
blocks without an Acquire (``Namespace.get``, docs/decisions.md). What a bucket holds:
(namespace tag, 16-byte key) → tier (HBM, DRAM or SSD: the fastest tier holding a copy, as the
daemon's Lookup answers), the block's DRAM slot offset (NO_OFFSET if it has none; an HBM block
keeps its DRAM slot here when it has one) and that slot's generation (kvstore/core/slotgen.py) when the block became
visible there. The namespace tag is the first 8 bytes of the namespace id with its low bit set
(0 marks an empty bucket), so a client needs nothing but the namespace id it already has.

Writer (daemon, through BlockTable's state-change methods):
    put(ns_tag, lo, hi, tier, offset, gen)
                                a block became visible or changed tier or slot (commit,
                                demote, promote); published only once the slot's bytes are
                                complete, so (offset, gen) always names a whole block
    remove(ns_tag, lo, hi)      a block stopped being visible (delete, evict, discard)
    rebuild(...)                rewrite the whole table (too many tombstones, or back from full)

Consistency (a seqlock per bucket, one for the table):
- Every bucket has a version word: odd while the daemon writes the bucket, bumped to the next
  even value after. A reader reads the version, the bucket's fields, then the version again; a
  bucket whose two reads differ or are odd is torn and is read again, never used.
- A rebuild moves keys between buckets, so it makes the table's ``epoch`` odd first and even
  after; a probe that saw the epoch change (or odd) is thrown away and retried.
- A key never moves between buckets except in a rebuild (deletion leaves a tombstone), so a
  probe that read each bucket consistently saw the key where it was at some instant between
  its first and last read: its answer is one the daemon's own lookup could have given.
- Full (more live blocks than 60% of the buckets): the ``overflow`` flag is set and readers fall
  back to the Lookup RPC until a rebuild fits again. ``closed`` is set when the daemon stops.
- Heartbeat: the daemon writes CLOCK_MONOTONIC (system-wide on Linux) into the header every
  HEARTBEAT_S; a reader that finds it older than STALE_S falls back to the RPC. A daemon that is
  alive but not answering (stopped, wedged) would fail the acquire that follows a lookup anyway:
  its snapshot is not trusted, so the caller's timeout and fallback accounting see the stall.
- Liveness: the daemon holds an exclusive flock on the file for its whole life; a reader whose
  non-blocking shared flock succeeds knows the daemon is gone (SIGKILL releases the lock at once)
  and asks for a reconnect through the RPC instead. A lock on the file, unlike a pid, works
  across pid namespaces (containers sharing the shm directory).
- Memory order as in kvstore/core/slotgen.py: x86-64 TSO orders the reader's loads and the writer's
  stores in program order; other architectures would need fences, so there the SDK does not map
  the snapshot and asks the daemon (kvstore/core/memorder.py).

Versions: a daemon with an HBM tier writes tier HBM and marks its file ``KVSIDX02``; without one
it writes ``KVSIDX01`` (tiers DRAM and SSD only). An SDK maps both; an older SDK maps only the
first, so against a daemon with an HBM tier it asks over gRPC, never misreading tier HBM.

What it does not hold: the remote tier (the ``remote`` flag tells clients to ask the daemon
when the local prefix is short).
The file itself is kvstore.core.shmfile's (0600, removed with its arena, orphans cleaned up).
"""
from __future__ import annotations

import fcntl
import time
from pathlib import Path

import numpy as np

from kvstore.core.shmfile import ShmFile, attach_companion, companion_path, create_companion

DEFAULT_ENTRIES = 1 << 20            # buckets (41 bytes each), when nothing better is known
MIN_ENTRIES, MAX_ENTRIES = 1 << 16, 1 << 22
TYPICAL_BLOCK_BYTES = 64 << 10       # sizing guess: a 16-token block of a small model
EMPTY, DRAM, SSD, HBM, TOMB = 0, 1, 2, 3, 255
NO_OFFSET = -1                       # a bucket's offset when the block has no DRAM slot
TIER_NAMES = {DRAM: "DRAM", SSD: "SSD", HBM: "HBM"}
_NAMES = ["?"] * 256
for _t, _name in TIER_NAMES.items():
    _NAMES[_t] = _name
CLOSED, OVERFLOW, REMOTE = 1, 2, 4   # header flag bits

_MAGIC = b"KVSIDX01"                 # tiers DRAM and SSD
_MAGIC_HBM = b"KVSIDX02"             # tier HBM as well (a daemon with an HBM tier)
_EPOCH_AT, _FLAGS_AT, _BEAT_AT = 32, 40, 48   # uint64 words after the header
HEARTBEAT_S = 0.1                    # how often the daemon stamps the header
STALE_S = 1.0                        # a stamp older than this: readers ask the daemon instead
_STALE_NS = int(STALE_S * 1e9)
_DATA_OFFSET = 4096
_MIX = 0x9E3779B97F4A7C15
_U64 = (1 << 64) - 1
_MAX_LOAD = 0.6                      # live buckets above this fraction: overflow
_MAX_USED = 0.8                      # live + tombstones above this: rebuild
_MAX_TRIES = 16                      # probe attempts before a reader gives up (falls back)


class ShmIndexError(RuntimeError):
    pass


def buckets_for(capacity_bytes: int) -> int:
    """Buckets for a daemon holding ``capacity_bytes`` in DRAM and SSD: room for every block
    of TYPICAL_BLOCK_BYTES under the 60% load limit, a power of two in [MIN_ENTRIES,
    MAX_ENTRIES] (3 MiB to 164 MiB of tmpfs). Past the limit lookups fall back to the RPC."""
    want = int(capacity_bytes // TYPICAL_BLOCK_BYTES / _MAX_LOAD) + 1
    return min(MAX_ENTRIES, max(MIN_ENTRIES, 1 << (want - 1).bit_length()))


def path_for(arena_path: str | Path) -> Path:
    return companion_path(arena_path, ".index")


def ns_tag(namespace_id: bytes) -> int:
    """The 64-bit tag a namespace's buckets carry (never 0: 0 marks an empty bucket)."""
    return int.from_bytes(bytes(namespace_id)[:8].ljust(8, b"\0"), "little") | 1


_FIELDS = (("tag", np.uint64), ("lo", np.uint64), ("hi", np.uint64), ("off", np.int64),
           ("ver", np.uint32), ("gen", np.uint32), ("tier", np.uint8))
_NAMES_ = tuple(name for name, _ in _FIELDS)


def _layout(buckets: int) -> tuple[dict[str, tuple[int, type]], int]:
    fields, off = {}, _DATA_OFFSET
    for name, dtype in _FIELDS:
        fields[name] = (off, dtype)
        off += buckets * np.dtype(dtype).itemsize
        off = -(-off // 64) * 64
    return fields, off


class ShmIndex:
    """The snapshot of one arena. :meth:`create` (daemon, the only writer) or :meth:`attach`
    (client, read-only)."""

    def __init__(self, file: ShmFile, buckets: int):
        self.path = file.path
        self._file = file
        mm = file.mm
        self._owner = owner = file.owner
        self.buckets = buckets
        self._mask = buckets - 1
        fields, _ = _layout(buckets)
        for name, (off, dtype) in fields.items():
            setattr(self, name, np.frombuffer(mm, dtype=dtype, count=buckets, offset=off))
        self._words = np.frombuffer(mm, dtype=np.uint64, count=3, offset=_EPOCH_AT)
        self.live = 0     # writer only
        self.used = 0     # writer only: live + tombstones
        # The writer's scalar accesses go through memoryviews: a Python int per element costs
        # a tenth of a numpy scalar, and a put writes every block of a commit one by one.
        self._views: list[memoryview] = []
        if owner:
            for name, (off, dtype) in fields.items():
                size = np.dtype(dtype).itemsize
                code = "q" if dtype is np.int64 else {8: "Q", 4: "I", 1: "B"}[size]
                mv = memoryview(mm)[off:off + buckets * size].cast(code)
                self._views.append(mv)
                setattr(self, "_w" + name, mv)

    @classmethod
    def create(cls, arena_path: str | Path, arena_uuid: bytes, buckets: int = DEFAULT_ENTRIES,
               remote: bool = False, hbm: bool = False) -> "ShmIndex":
        """``hbm``: the daemon has an HBM tier (tier HBM is written; see Versions above)."""
        if buckets < 16 or buckets & (buckets - 1):
            raise ValueError(f"buckets must be a power of two >= 16, got {buckets}")
        file = create_companion(path_for(arena_path), _MAGIC_HBM if hbm else _MAGIC,
                                arena_uuid, buckets,
                                _layout(buckets)[1])
        fcntl.flock(file.fd, fcntl.LOCK_EX)   # held until this process exits: readers' liveness
        idx = cls(file, buckets)
        # Touch every page now (tens of ms for the default size): first touches under the
        # daemon's commits would otherwise cost a page fault per new block.
        for name in _NAMES_:
            getattr(idx, name).fill(0)
        idx.off.fill(NO_OFFSET)
        idx._words[1] = REMOTE if remote else 0
        idx.beat()
        return idx

    @classmethod
    def attach(cls, path: str | Path, arena_uuid: bytes) -> "ShmIndex":
        """Map a snapshot read-only; ShmIndexError if it is absent or not this arena's."""
        file, buckets = attach_companion(path, ShmIndexError, "index snapshot",
                                         (_MAGIC, _MAGIC_HBM),
                                         arena_uuid, _DATA_OFFSET, lambda n: _layout(n)[1])
        return cls(file, buckets)

    # -- header ------------------------------------------------------------------------------
    @property
    def flags(self) -> int:
        return int(self._words[1])

    @property
    def capacity_blocks(self) -> int:
        """Live blocks it holds before it overflows (readers then fall back)."""
        return int(self.buckets * _MAX_LOAD)

    @property
    def epoch(self) -> int:
        """Twice the rebuilds so far (odd while one runs)."""
        return int(self._words[0])

    def beat(self) -> None:
        """Stamp the header with the daemon's clock (the daemon calls this every HEARTBEAT_S)."""
        self._words[2] = time.monotonic_ns()

    @property
    def fresh(self) -> bool:
        """The daemon stamped the header within STALE_S."""
        return time.monotonic_ns() - int(self._words[2]) <= _STALE_NS

    @property
    def daemon_alive(self) -> bool:
        """The writer still holds its lock on the file (it has not exited or been killed)."""
        if self._owner:
            return True      # a lock call on our own descriptor would convert our lock
        try:
            fcntl.flock(self._file.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        fcntl.flock(self._file.fd, fcntl.LOCK_UN)
        return False

    def _set_flag(self, bit: int, on: bool) -> None:
        f = int(self._words[1])
        self._words[1] = (f | bit) if on else (f & ~bit)

    # -- writer (daemon) --------------------------------------------------------------------
    def _home(self, tag: int, lo: int) -> int:
        return (lo ^ ((tag * _MIX) & _U64)) & self._mask

    def _write(self, b: int, tag: int, lo: int, hi: int, tier: int, off: int, gen: int) -> None:
        ver = self._wver
        v = ver[b]
        ver[b] = (v + 1) & 0xFFFFFFFF     # odd: readers of this bucket retry
        self._wtag[b] = tag
        self._wlo[b] = lo
        self._whi[b] = hi
        self._woff[b] = off
        self._wgen[b] = gen
        self._wtier[b] = tier
        ver[b] = (v + 2) & 0xFFFFFFFF     # even again: consistent

    def put(self, tag: int, lo: int, hi: int, tier: int, off: int = NO_OFFSET,
            gen: int = 0) -> None:
        """Publish (or re-tier, or move) one visible block: its DRAM slot ``off`` (NO_OFFSET:
        none) holds its whole bytes, and had generation ``gen`` when they were complete."""
        if self.flags & OVERFLOW:
            return
        pos, tomb, mask = self._home(tag, lo), -1, self._mask
        tags, los, his, tiers = self._wtag, self._wlo, self._whi, self._wtier
        while True:
            t = tiers[pos]
            if t == EMPTY:
                break
            if t == TOMB:
                if tomb < 0:
                    tomb = pos
            elif los[pos] == lo and his[pos] == hi and tags[pos] == tag:
                if t != tier or self._woff[pos] != off or self._wgen[pos] != gen:
                    self._write(pos, tag, lo, hi, tier, off, gen)
                return
            pos = (pos + 1) & mask
        if self.live + 1 > _MAX_LOAD * self.buckets:
            self._set_flag(OVERFLOW, True)     # readers fall back until a rebuild fits
            return
        if tomb >= 0:
            pos = tomb
        else:
            self.used += 1
        self._write(pos, tag, lo, hi, tier, off, gen)
        self.live += 1

    def put_many(self, tags: np.ndarray, keys: np.ndarray, tiers: np.ndarray,
                 offs: np.ndarray, gens: np.ndarray) -> None:
        """:meth:`put` for each of n distinct blocks (uint64 tags, [n, 2] uint64 keys, uint8
        tiers, int64 offsets, uint32 generations): readers find what n puts would publish,
        though a block may sit in another bucket. Blocks already in their home bucket are
        rewritten and new blocks whose home bucket is empty are placed first, in numpy calls,
        each bucket under its own version bump as put does; the rest (a collision, a
        tombstone, the load limit) one by one."""
        if self.flags & OVERFLOW:
            return
        lo = np.ascontiguousarray(keys[:, 0], dtype=np.uint64)
        hi = np.ascontiguousarray(keys[:, 1], dtype=np.uint64)
        pos = ((lo ^ (tags * np.uint64(_MIX))) & np.uint64(self._mask)).astype(np.int64)
        t = self.tier[pos]
        home = (t != EMPTY) & (t != TOMB) & (self.lo[pos] == lo) & (self.hi[pos] == hi) & \
            (self.tag[pos] == tags)
        done = home.copy()
        i = np.flatnonzero(home)
        if len(i):
            p = pos[i]
            moved = (t[i] != tiers[i]) | (self.off[p] != offs[i]) | (self.gen[p] != gens[i])
            i, p = i[moved], p[moved]
            if len(i):
                self.ver[p] += np.uint32(1)          # odd: readers of these buckets retry
                self.off[p] = offs[i]
                self.gen[p] = gens[i]
                self.tier[p] = tiers[i]
                self.ver[p] += np.uint32(1)          # even again: consistent
        new = np.flatnonzero(~home & (t == EMPTY))
        if len(new):
            # An empty home bucket: the key is nowhere else (linear probing starts there).
            # Two new keys with one home: the first takes it, the other probes on below.
            _, first = np.unique(pos[new], return_index=True)
            i = new[first]
            if self.live + len(i) <= _MAX_LOAD * self.buckets:
                p = pos[i]
                self.ver[p] += np.uint32(1)
                self.tag[p] = tags[i]
                self.lo[p] = lo[i]
                self.hi[p] = hi[i]
                self.off[p] = offs[i]
                self.gen[p] = gens[i]
                self.tier[p] = tiers[i]
                self.ver[p] += np.uint32(1)
                self.live += len(i)
                self.used += len(i)
                done[i] = True
        for j in np.flatnonzero(~done).tolist():
            self.put(int(tags[j]), int(lo[j]), int(hi[j]), int(tiers[j]), int(offs[j]),
                     int(gens[j]))

    def remove(self, tag: int, lo: int, hi: int) -> None:
        """Hide one block (no-op if absent); see needs_rebuild for the tombstones it leaves."""
        if self.flags & OVERFLOW:
            return
        pos, mask = self._home(tag, lo), self._mask
        tags, los, his, tiers = self._wtag, self._wlo, self._whi, self._wtier
        while True:
            t = tiers[pos]
            if t == EMPTY:
                return
            if t != TOMB and los[pos] == lo and his[pos] == hi and tags[pos] == tag:
                self._write(pos, 0, 0, 0, TOMB, NO_OFFSET, 0)
                self.live -= 1
                return
            pos = (pos + 1) & mask

    def needs_rebuild(self) -> bool:
        """Too many tombstones (probes get long), or full and waiting to fit again."""
        return self.used > _MAX_USED * self.buckets or bool(self.flags & OVERFLOW)

    def fits(self, n: int) -> bool:
        return n <= _MAX_LOAD * self.buckets

    def rebuild(self, tags: np.ndarray, keys: np.ndarray, tiers: np.ndarray,
                offs: np.ndarray | None = None, gens: np.ndarray | None = None) -> bool:
        """Rewrite the table with exactly these blocks (uint64 tags, [n, 2] uint64 keys, uint8
        tiers, int64 DRAM offsets and uint32 generations as :meth:`put` takes them; None:
        no slots). Returns False (and leaves the overflow flag set) if they do not fit."""
        n = len(tags)
        if not self.fits(n):
            self._set_flag(OVERFLOW, True)
            return False
        self._words[0] += np.uint64(1)       # odd: every probe running now is retried
        self.ver += np.uint32(2)             # a reader mid-bucket sees its version change too
        self.tier[:] = EMPTY
        tags = np.asarray(tags, dtype=np.uint64)
        offs = np.full(n, NO_OFFSET, dtype=np.int64) if offs is None else np.asarray(offs)
        gens = np.zeros(n, dtype=np.uint32) if gens is None else np.asarray(gens)
        lo = np.ascontiguousarray(keys[:, 0], dtype=np.uint64)
        pos = ((lo ^ (tags * np.uint64(_MIX))) & np.uint64(self._mask)).astype(np.int64)
        pending = np.arange(n)
        while len(pending):
            open_ = np.flatnonzero(self.tier[pos] == EMPTY)
            if len(open_):
                slots, first = np.unique(pos[open_], return_index=True)
                won = open_[first]
                i = pending[won]
                self.tag[slots] = tags[i]
                self.lo[slots] = keys[i, 0]
                self.hi[slots] = keys[i, 1]
                self.off[slots] = offs[i]
                self.gen[slots] = gens[i]
                self.tier[slots] = tiers[i]
                keep = np.ones(len(pending), dtype=bool)
                keep[won] = False
                pending, pos = pending[keep], pos[keep]
            pos = (pos + 1) & self._mask
        self.live = self.used = n
        self._set_flag(OVERFLOW, False)
        self._words[0] += np.uint64(1)       # even: consistent
        return True

    # -- reader (client) ---------------------------------------------------------------------
    def probe(self, tag: int, keys) -> np.ndarray | None:
        """Tier of each key (uint8: HBM, DRAM, SSD, or EMPTY for a miss), all keys probed at once;
        None when the snapshot cannot answer (closed, full, or still torn after retries):
        ask the daemon instead."""
        got = self._probe(tag, keys, False)
        return None if got is None else got[0]

    def probe_slots(self, tag: int, keys) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """As :meth:`probe`, with each key's DRAM slot: (tiers uint8, offsets int64 (NO_OFFSET
        where none or a miss), generations uint32), each bucket's three read under one seqlock
        read; None when the snapshot cannot answer. The lease-free get's probe."""
        return self._probe(tag, keys, True)

    def _probe(self, tag: int, keys, slots: bool):
        q = np.frombuffer(keys, dtype=np.uint64).reshape(-1, 2) if isinstance(
            keys, (bytes, bytearray, memoryview)) else keys
        n = len(q)
        qlo, qhi = np.ascontiguousarray(q[:, 0]), np.ascontiguousarray(q[:, 1])
        mask = self._mask
        home = ((qlo ^ np.uint64((tag * _MIX) & _U64)) & np.uint64(mask)).astype(np.int64)
        words, tag_ = self._words, np.uint64(tag)
        ver, tier_, tags, los, his = self.ver, self.tier, self.tag, self.lo, self.hi
        offs_, gens_ = self.off, self.gen
        for _ in range(_MAX_TRIES):
            e1 = int(words[0])
            if (int(words[1]) & (CLOSED | OVERFLOW) or not self.fresh
                    or not self.daemon_alive):
                return None
            if e1 & 1:
                continue      # a rebuild is running
            out = np.zeros(n, dtype=np.uint8)
            if slots:
                out_off = np.full(n, NO_OFFSET, dtype=np.int64)
                out_gen = np.zeros(n, dtype=np.uint32)
            active, pos, alo, ahi = None, home, qlo, qhi     # active None: every key
            steps = 0
            while len(pos) and steps < 4 * _MAX_TRIES + 64:
                steps += 1
                # the seqlock order: version, then the fields, then the version again
                v1 = ver[pos]
                t = tier_[pos]
                tg = tags[pos]
                lo = los[pos]
                hi = his[pos]
                if slots:
                    of = offs_[pos]
                    ge = gens_[pos]
                v2 = ver[pos]
                ok = (v1 == v2) & ((v1 & 1) == 0)
                hit = ok & (tg == tag_) & (lo == alo) & (hi == ahi) & (t != EMPTY) & (t != TOMB)
                where = np.flatnonzero(hit) if active is None else active[hit]
                out[where] = t[hit]
                if slots:
                    out_off[where] = of[hit]
                    out_gen[where] = ge[hit]
                if active is None:
                    active = np.arange(n)
                # torn buckets are read again at the same position; the rest move on
                step = ok & ~hit & (t != EMPTY)
                keep = ~ok | step
                if not keep.any():
                    pos = pos[:0]
                    break
                active, alo, ahi = active[keep], alo[keep], ahi[keep]
                pos = (pos[keep] + step[keep]) & mask
            if len(pos):
                continue
            if int(words[0]) == e1:
                return (out, out_off, out_gen) if slots else (out,)
        return None

    def close(self) -> None:
        if self._file.closed:
            return
        if self._owner:
            self._set_flag(CLOSED, True)
            for name in _NAMES_ + ("_words",):
                setattr(self, name, None)
                setattr(self, "_w" + name.lstrip("_"), None)
            for mv in self._views:
                mv.release()
            self._views = []
        # A reader keeps its arrays: a probe still running on another thread (a reconnect
        # re-maps under it) reads the old mapping, which stays valid until they are dropped.
        self._file.close()


def prefix(tiers: np.ndarray) -> tuple[int, list[str]]:
    """The longest-prefix walk over a probe's answer: (blocks cached, their tier names)."""
    miss = np.flatnonzero(tiers == EMPTY)
    n = int(miss[0]) if len(miss) else len(tiers)
    names = _NAMES
    return n, [names[t] for t in tiers[:n].tolist()]


def dram_prefix(tiers: np.ndarray, offsets: np.ndarray) -> int:
    """How many leading keys of a probe_slots answer are blocks with a published DRAM slot
    (what a lease-free get may copy): DRAM blocks, and HBM blocks that keep a DRAM copy."""
    bad = np.flatnonzero(((tiers != DRAM) & (tiers != HBM)) | (offsets < 0))
    return int(bad[0]) if len(bad) else len(tiers)
