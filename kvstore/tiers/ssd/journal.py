"""The SSD index journal: what the SSD tier holds, rebuilt after a restart or a crash.

An append-only file of framed records ``magic | length | type | xxh3-64 | payload`` (the
checksum covers magic, length, type and payload):

    HDR   first frame of every journal file: the journal format (an empty file, or one whose
          first frame is lost, is damaged, never "no blocks")
    NS    a namespace registration (digest, model id, tenant, layout); its ordinal names it below
    SEG   segment n is cut into slots of this many bytes
    PUTS  blocks (namespace ordinal, key, parent key, depth) live in slots addr, with these
          checksums and sequence numbers: one frame per batch, entries packed as a numpy
          structured array, so millions of blocks replay and compact at numpy speed
    DEL   slot addr no longer holds a block (with the sequence number of the deletion)

Contract:
- A PUT is appended only after the slot's data write completed; ``await sync()`` returns once
  every record appended before the call is fsync'd (group commit: concurrent callers share one
  fsync). A block whose PUT is durable survives a crash.
- Replay resynchronises: a frame that fails its checksum or its length bound (a torn tail, a
  flipped or zeroed region) is skipped and replay scans forward for the next magic that starts a
  frame which verifies. A payload that contains the magic is never taken for a frame inside an
  intact run (frames are walked by their lengths) and, after a damaged region, only if a 64-bit
  checksum over header and payload matches. Everything that verifies is applied in file order;
  ``JournalState`` says how much was skipped (the caller then rebuilds from the slab files).
- ``rewrite`` compacts the journal to the live records (write a new file, fsync, rename), done at
  startup and at a clean shutdown, and while running once dead records outnumber live ones.
- The journal and its compaction temp file are created 0600 (they name models and tenants).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from kvstore.core.keys import KEY_BYTES

log = logging.getLogger("kvstore.journal")

NS, SEG, PUTS, DEL, HDR = 1, 2, 6, 7, 8
JOURNAL_FORMAT = 2
_MAGIC = b"KVJ\x02"
_HEAD = struct.Struct("<4sIB")            # magic, payload length, type
_FRAME = struct.Struct("<4sIBQ")          # ... then xxh3-64(head + payload)
_SEG = struct.Struct("<IQ")
_DEL = struct.Struct("<QQ")               # addr, seq
# One block of a PUTS frame; parent is all zeros for a chain root.
PUT_DTYPE = np.dtype([("ns", "<u4"), ("key", "<u8", (2,)), ("parent", "<u8", (2,)),
                      ("depth", "<u4"), ("addr", "<i8"), ("csum", "<u8"), ("seq", "<u8")])
_PUTS_PER_FRAME = 4096
# No frame is longer: a corrupted length cannot make replay swallow the rest of the file.
MAX_PAYLOAD = _PUTS_PER_FRAME * PUT_DTYPE.itemsize + 65536


@dataclass
class NamespaceRecord:
    namespace_id: bytes
    model_id: str
    tenant: str
    layout: dict


@dataclass
class JournalState:
    namespaces: list[NamespaceRecord]
    segments: dict[int, int]              # segment -> slot bytes
    puts: np.ndarray                      # live PUT_DTYPE entries (last word per addr)
    deleted: dict = None                  # addr -> seq, for slots whose last event is a DEL
    records: int = 0                      # frames applied (the HDR frame not counted)
    truncated_bytes: int = 0              # bytes skipped (damaged regions and a torn tail)
    damaged_regions: int = 0              # runs of bytes skipped between verified frames
    has_header: bool = False
    exists: bool = False

    @property
    def damaged(self) -> bool:
        """True when the journal cannot be trusted to list every block: missing, empty,
        headerless, or with skipped bytes."""
        return not self.has_header or self.truncated_bytes > 0


def _frame(rtype: int, payload: bytes) -> bytes:
    head = _HEAD.pack(_MAGIC, len(payload), rtype)
    return head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head + payload)) + payload


def encode_header() -> bytes:
    return _frame(HDR, json.dumps({"format": JOURNAL_FORMAT}).encode())


def encode_ns(rec: NamespaceRecord) -> bytes:
    meta = json.dumps({"model_id": rec.model_id, "tenant": rec.tenant, "layout": rec.layout})
    return _frame(NS, rec.namespace_id + meta.encode())


def encode_seg(segment: int, slot_bytes: int) -> bytes:
    return _frame(SEG, _SEG.pack(segment, slot_bytes))


def encode_puts(entries: np.ndarray) -> bytes:
    out = bytearray()
    for i in range(0, len(entries), _PUTS_PER_FRAME):
        out += _frame(PUTS, entries[i:i + _PUTS_PER_FRAME].tobytes())
    return bytes(out)


def encode_del(addr: int, seq: int = 0) -> bytes:
    return _frame(DEL, _DEL.pack(addr, seq))


def _frame_at(data: bytes, pos: int) -> tuple[int, bytes, int] | None:
    """(type, payload, end) of a frame that verifies at ``pos``, else None."""
    if pos + _FRAME.size > len(data):
        return None
    magic, length, rtype, csum = _FRAME.unpack_from(data, pos)
    end = pos + _FRAME.size + length
    if magic != _MAGIC or length > MAX_PAYLOAD or end > len(data):
        return None
    payload = data[pos + _FRAME.size:end]
    if xxhash.xxh3_64_intdigest(data[pos:pos + _HEAD.size] + payload) != csum:
        return None
    return rtype, payload, end


class Journal:
    def __init__(self, path: Path, pool):
        self.path = Path(path)
        self.pool = pool
        # Group-commit flushes run on a thread of their own: queued behind the slab I/O pool's
        # reads and writes, a commit's fsync would wait for every other request's data.
        self._flusher: ThreadPoolExecutor | None = None     # started by the first flush
        self._buf = bytearray()
        self._appended = 0        # records appended so far
        self._durable = 0         # records known fsync'd
        self._flush_task: asyncio.Future | None = None
        self._fd: int | None = None
        self.records_in_file = 0
        # Serializes file writes (pool threads) with rewrite/close (loop thread): a compaction
        # must never interleave with, or have its fd reused under, an in-flight append.
        self._io_lock = threading.Lock()

    # -- replay and compaction ----------------------------------------------------------------
    def replay(self) -> JournalState:
        st = JournalState([], {}, np.empty(0, dtype=PUT_DTYPE), {})
        # Events in file order; resolved at the end: an addr's last event wins.
        self._puts, self._dels = [], []
        try:
            data = self.path.read_bytes()
            st.exists = True
        except FileNotFoundError:
            data = b""
        pos = 0
        while pos < len(data):
            frame = _frame_at(data, pos)
            if frame is not None:
                rtype, payload, end = frame
                try:
                    if rtype == HDR:
                        if json.loads(payload).get("format") != JOURNAL_FORMAT:
                            raise ValueError("journal of another format")
                        st.has_header = True
                    else:
                        self._apply(st, rtype, payload)
                        st.records += 1
                    pos = end
                    continue
                except (ValueError, struct.error, KeyError, TypeError, AttributeError):
                    pass        # verified but unusable: skipped like a damaged frame
            # Resynchronise: the next magic that starts a verifying frame.
            nxt = pos + 1
            while True:
                nxt = data.find(_MAGIC, nxt)
                if nxt < 0 or _frame_at(data, nxt) is not None:
                    break
                nxt += 1
            nxt = len(data) if nxt < 0 else nxt
            st.truncated_bytes += nxt - pos
            st.damaged_regions += 1
            log.warning("journal %s: skipping %d damaged bytes at offset %d%s", self.path,
                        nxt - pos, pos, " (torn tail)" if nxt == len(data) else
                        "; resynchronised on the next valid frame")
            pos = nxt
        st.puts, st.deleted = self._resolve(self._puts, self._dels, len(st.namespaces))
        return st

    @staticmethod
    def _resolve(puts, dels, n_ns: int) -> tuple[np.ndarray, dict]:
        """Live PUT entries (an addr's last event in file order wins) and {addr: seq} of the
        slots whose last event is a DEL."""
        entries = np.concatenate([e for _, e in puts]) if puts else np.empty(0, dtype=PUT_DTYPE)
        seq = np.concatenate([np.full(len(e), s, dtype=np.int64) for s, e in puts]) if puts \
            else np.empty(0, dtype=np.int64)
        del_addr = np.array([a for _, a, _ in dels], dtype=np.int64)
        del_seq = np.array([s for s, _, _ in dels], dtype=np.int64)
        addr = np.concatenate([entries["addr"], del_addr])
        seqs = np.concatenate([seq, del_seq])
        kind = np.concatenate([np.arange(len(entries)), np.full(len(del_addr), -1)])
        order = np.lexsort((seqs, addr))
        last = np.ones(len(order), dtype=bool)
        last[:-1] = addr[order][1:] != addr[order][:-1]
        winners = kind[order][last]
        live = entries[winners[winners >= 0]]
        last_dels = {int(a): 0 for a in addr[order][last][winners < 0].tolist()}
        for _, a, dseq in dels:
            if a in last_dels:
                last_dels[a] = max(last_dels[a], dseq)
        return live[live["ns"] < n_ns], last_dels

    def _apply(self, st: JournalState, rtype: int, payload: bytes) -> None:
        if rtype == NS:
            meta = json.loads(payload[KEY_BYTES:])
            st.namespaces.append(NamespaceRecord(payload[:KEY_BYTES], meta["model_id"], meta["tenant"],
                                                 meta["layout"]))
        elif rtype == SEG:
            seg, slot_bytes = _SEG.unpack(payload)
            st.segments[seg] = slot_bytes
        elif rtype == PUTS:
            if len(payload) % PUT_DTYPE.itemsize:
                raise ValueError("PUTS frame of a partial entry")
            self._puts.append((st.records, np.frombuffer(payload, dtype=PUT_DTYPE)))
        elif rtype == DEL:
            addr, seq = _DEL.unpack(payload)
            self._dels.append((st.records, addr, seq))
        else:
            raise ValueError(f"unknown record type {rtype}")

    def rewrite(self, records: list) -> None:
        """Replace the journal with these records (atomically) and reopen for append. A record
        is encoded bytes, or a PUT_DTYPE array (encoded here, off the event loop when this runs
        in the pool). On failure the old journal stays in place."""
        tmp = self.path.with_suffix(".compact")
        n = 0
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)            # a leftover temp file from a crash keeps its mode
        with open(fd, "wb") as f:
            f.write(encode_header())
            for r in records:
                if isinstance(r, np.ndarray):
                    r = encode_puts(r)
                f.write(r)
                n += 1
            f.flush()
            os.fsync(f.fileno())
        with self._io_lock:
            self._close()
            os.replace(tmp, self.path)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.fchmod(self._fd, 0o600)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self.records_in_file = n

    # -- appending ---------------------------------------------------------------------------
    def append(self, encoded: bytes) -> None:
        self._buf += encoded
        self._appended += 1
        self.records_in_file += 1

    async def sync(self) -> None:
        """Return once every record appended before this call is on disk (fsync'd)."""
        target = self._appended
        while self._durable < target:
            if self._flush_task is None:
                self._flush_task = asyncio.ensure_future(self._flush())
            await asyncio.shield(self._flush_task)

    async def _flush(self) -> None:
        data, upto = bytes(self._buf), self._appended
        self._buf.clear()
        try:
            await asyncio.get_running_loop().run_in_executor(self._flush_thread(), self._write, data)
            self._durable = upto
        finally:
            self._flush_task = None

    def start_rewrite(self, records: list) -> asyncio.Future:
        """Compact in the pool while the daemon keeps running. The caller guarantees that no
        flush is in flight and that ``records`` already reflect every record appended so far
        (so the buffer is dropped). Appends made meanwhile stay buffered; syncs wait for the
        rewrite, then flush them into the new file."""
        assert self._flush_task is None
        upto = self._appended
        self._buf.clear()

        async def run() -> None:
            try:
                await asyncio.get_running_loop().run_in_executor(self.pool, self.rewrite, records)
                self._durable = max(self._durable, upto)
            except OSError as exc:
                log.warning("journal compaction failed (%s); the old journal stays", exc)
            finally:
                self._flush_task = None
        self._flush_task = asyncio.ensure_future(run())
        return self._flush_task

    def open_append(self, header: bool) -> None:
        """Open the journal as found for appending (writes while the index loads, before the
        compaction that ends the load rewrites it). ``header``: write the HDR frame first when
        the file is new or empty (a directory just created); otherwise a missing file stays
        headerless, so the next replay still calls it damaged and scans the slab files."""
        with self._io_lock:
            self._close()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.fchmod(fd, 0o600)
            self._fd = fd
            if header and os.fstat(fd).st_size == 0:
                self._write_locked(encode_header())

    def replace_blocking(self, records: list) -> None:
        """Replace the journal with ``records``, which the caller guarantees reflect every
        record appended so far (the buffer is dropped), blocking: startup and shutdown."""
        self._buf.clear()
        self._durable = self._appended
        self.rewrite(records)

    def busy(self) -> bool:
        """A flush or a background rewrite is in flight."""
        return self._flush_task is not None

    async def idle(self) -> None:
        """Wait until no flush or background rewrite is in flight."""
        while self._flush_task is not None:
            await asyncio.shield(self._flush_task)

    def _write(self, data: bytes) -> None:
        with self._io_lock:
            self._write_locked(data)

    def _write_locked(self, data: bytes) -> None:
        if self._fd is None:
            raise OSError(9, "journal is closed")
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        os.fsync(self._fd)

    def flush_blocking(self) -> None:
        """Write and fsync what is buffered (shutdown; not on the event loop's hot path)."""
        if self._fd is None:
            return
        data = bytes(self._buf)
        self._buf.clear()
        self._write(data)
        self._durable = self._appended

    def is_open(self) -> bool:
        """Open for appending (a rewrite opens it: the first one at startup)."""
        return self._fd is not None

    def pending(self) -> int:
        return self._appended - self._durable

    def close(self) -> None:
        with self._io_lock:
            self._close()
        if self._flusher is not None:
            self._flusher.shutdown(wait=False)
            self._flusher = None

    def _flush_thread(self) -> ThreadPoolExecutor:
        if self._flusher is None:
            self._flusher = ThreadPoolExecutor(1, thread_name_prefix="kvstore-journal")
        return self._flusher

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
