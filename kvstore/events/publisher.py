"""The KV-event publisher: a ZMQ PUB socket in vLLM's wire format, a replay ROUTER, snapshots.

Sockets (both bound by the daemon):

- PUB ``endpoint``: every batch as ``(topic, seq, payload)`` (kvstore.events.wire). Sequence
  numbers grow by one per batch from the daemon's start time in microseconds (above any number
  an earlier run of the daemon used); the first batch is ``AllBlocksCleared`` (the daemon starts
  empty, then publishes what it recovers from SSD). An idle daemon publishes an empty batch
  every ``heartbeat_s``, so a subscriber notices a lost batch (or a restart) within that time.
  A number that never arrives is a lost batch: either the daemon dropped it (its event log was
  full: counted in ``kv_events_dropped``) or ZMQ dropped it for a subscriber over its
  high-water mark.
- ROUTER ``replay_endpoint`` (optional), vLLM's replay protocol: a DEALER/REQ client sends
  ``[b"", start_seq (8 bytes, big-endian)]`` and gets every buffered batch with ``seq >=
  start_seq`` as ``[b"", topic, seq, payload]``, then ``[b"", b"", END_SEQ, b""]``. The buffer
  keeps the last ``buffer_batches`` batches; a dropped batch is never in it, so a gap the replay
  cannot fill stays visible. Then the client sends ``[b"", b"snapshot"]`` and gets the daemon's
  whole content: batches tagged with one sequence number S, the first event ``AllBlocksCleared``,
  then ``BlockStored`` for every block in every tier (parents before children), then END_SEQ.
  The snapshot reflects exactly the batches up to S: apply it, then live batches with seq > S.
  An END_SEQ frame with a non-empty payload is a refusal (``busy``: too many snapshots at once;
  ``bad request``), to be retried later.

Threads: recording happens on the event loop (kvstore.events.log); everything here — grouping,
msgpack encoding, sends, the replay buffer, answering the ROUTER — runs on one publisher thread.
PUB and ROUTER sends never block (ZMQ drops for a slow peer instead), so a stalled or absent
subscriber costs the data path nothing. A snapshot is taken on the loop (``snapshot`` callable,
called there through ``call_soon_threadsafe``) and queued behind the changes recorded before it.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time

import msgspec
import numpy as np
import zmq

from kvstore.core.keys import KEY_BYTES
from kvstore.events import wire
from kvstore.events.log import CLEARED, REMOVED, REMOVED_ONE, SNAPSHOT, EventLog, Record

log = logging.getLogger("kvstore.events")

_MAX_SNAPSHOTS = 4         # snapshot requests in flight at once; more are answered "busy"


class EventPublisher:
    """Publishes what ``events`` records. ``snapshot()`` runs on the event loop and returns the
    stored records of every block held (one per medium; kvstore.store.table.BlockTable.snapshot).

    Raises OSError-derived zmq.ZMQError from :meth:`start` when an endpoint cannot be bound.
    """

    def __init__(self, events: EventLog, endpoint: str, replay_endpoint: str = "",
                 topic: str = "", buffer_batches: int = 10_000, hwm: int = 100_000,
                 max_batch_events: int = 1024, snapshot=None, heartbeat_s: float = 1.0):
        self._events = events
        self._endpoint = endpoint
        self._replay_endpoint = replay_endpoint
        self._topic = topic.encode()
        self._hwm = hwm
        self._max_batch = max_batch_events
        self._snapshot = snapshot
        self._heartbeat_s = heartbeat_s
        self._last_send = 0.0
        self._buffer: collections.deque[tuple[int, bytes]] = collections.deque(
            maxlen=buffer_batches)
        self._ctx = zmq.Context()
        self._pub = self._replay = None
        self._thread: threading.Thread | None = None
        self._running = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._snapshots_in_flight = 0       # the publisher thread's: asked, not yet answered
        # Sequence numbers start at the start time in microseconds since the epoch, so a
        # restarted daemon continues above every number its predecessor used: a subscriber
        # sees a restart as a gap that no replay can fill, and takes a snapshot.
        self.seq = time.time_ns() // 1000 - 1     # the last sequence number used
        self.batches_published = 0
        self.events_published = 0

    def published(self) -> int:
        """Tier changes published so far: one per block stored or removed in a tier, one per
        AllBlocksCleared (the unit of ``dropped``)."""
        return self.events_published

    def dropped(self) -> int:
        """Tier changes dropped because the event log was full (each drop is a sequence gap)."""
        return self._events.dropped_events

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind the sockets and start the thread; the first batch is AllBlocksCleared."""
        self._loop = loop
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, self._hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        try:
            self._pub.bind(self._endpoint)
            if self._replay_endpoint:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.setsockopt(zmq.LINGER, 0)
                self._replay.bind(self._replay_endpoint)
        except zmq.ZMQError:
            self._close_sockets()
            self._ctx.term()
            raise
        self._events.cleared()
        self._running = True
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Publish what is recorded (within ``timeout_s``), stop the thread, close the sockets."""
        if self._thread is None:
            return
        self._running = False
        self._events.wake.set()
        self._thread.join(timeout_s)
        self._thread = None
        self._close_sockets()
        self._ctx.term()

    def _close_sockets(self) -> None:
        for s in (self._pub, self._replay):
            if s is not None:
                s.close(linger=0)
        self._pub = self._replay = None

    # -- the thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        enc = msgspec.msgpack.Encoder()
        seen_drops = 0
        while True:
            running = self._running
            self._events.wake.wait(min(0.05, self._heartbeat_s))
            self._events.wake.clear()
            try:
                if self._replay is not None:
                    while self._replay.poll(0):
                        self._answer(enc)
                while True:
                    recs = self._events.take(self._max_batch)
                    if not recs:
                        break
                    drops = self._events.drops
                    if drops != seen_drops:     # a dropped record: skip a number (a gap)
                        seen_drops = drops
                        self.seq += 1
                    self._publish(enc, recs)
                if time.monotonic() - self._last_send >= self._heartbeat_s:
                    self._send(enc, [], heartbeat=True)
            except Exception:       # the publisher must outlive any one bad batch
                log.exception("KV events: publishing failed")
                time.sleep(0.05)
            if not running and not self._events.pending():
                return

    def _publish(self, enc, recs: list) -> None:
        events: list = []
        allowed = self._events.allowed_mask()
        for rec in recs:
            if type(rec) is tuple:                       # one block (STORED_ONE, REMOVED_ONE)
                kind, medium, ns, key, parent = rec
                if allowed[ns]:
                    self._add_one(events, kind, medium, ns, key, parent)
            elif rec.kind == SNAPSHOT:
                self._send(enc, events)
                events = []
                self._send_snapshot(enc, rec)
            else:
                for ev in self._to_events(rec):
                    last = events[-1] if events else None
                    if type(ev) is wire.BlockRemoved and type(last) is wire.BlockRemoved \
                            and last.medium == ev.medium:
                        last.block_hashes.extend(ev.block_hashes)
                    else:
                        events.append(ev)
        self._send(enc, events)

    def _add_one(self, events: list, kind: str, medium: str, ns: int, key: bytes,
                 parent: bytes | None) -> None:
        """Append one block's change, extending the last event where it continues it: removals
        from the same medium, or a block whose parent ends the last stored chain."""
        last = events[-1] if events else None
        if kind == REMOVED_ONE:
            if type(last) is wire.BlockRemoved and last.medium == medium:
                last.block_hashes.append(key)
            else:
                events.append(wire.BlockRemoved(block_hashes=[key], medium=medium))
            return
        size = self._events.block_tokens(ns)
        if type(last) is wire.BlockStored and last.medium == medium \
                and parent is not None and last.block_hashes[-1] == parent \
                and last.block_size == size:
            last.block_hashes.append(key)
        else:
            events.append(wire.BlockStored(
                block_hashes=[key], parent_block_hash=parent, token_ids=[], block_size=size,
                lora_id=None, medium=medium, lora_name=None))

    def _send(self, enc, events: list, heartbeat: bool = False) -> None:
        """One batch on PUB and into the replay buffer. A heartbeat is an empty batch: it
        lets an idle daemon's subscribers notice a gap (or a restart) within heartbeat_s."""
        if not events and not heartbeat:
            return
        self._last_send = time.monotonic()
        self.seq += 1
        payload = enc.encode(wire.KVEventBatch(ts=time.time(), events=events))
        seq = wire.seq_bytes(self.seq)
        try:
            self._pub.send_multipart((self._topic, seq, payload), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass        # PUB drops rather than blocks; subscribers see the gap and replay
        self._buffer.append((self.seq, payload))
        self.batches_published += 1
        self.events_published += sum(len(getattr(e, "block_hashes", ())) or 1 for e in events)

    def _to_events(self, rec: Record) -> list:
        if rec.kind == CLEARED:
            return [wire.AllBlocksCleared()]
        allowed = self._events.allowed_mask()
        keep = allowed[rec.ns.astype(np.int64)]
        if not keep.all():
            if not keep.any():
                return []
            rec = Record(rec.kind, rec.medium, rec.ns[keep], rec.keys[keep],
                         None if rec.parents is None else rec.parents[keep],
                         None if rec.has_parent is None else rec.has_parent[keep])
        blob = np.ascontiguousarray(rec.keys).tobytes()
        hashes = [blob[i:i + KEY_BYTES] for i in range(0, len(blob), KEY_BYTES)]
        if rec.kind == REMOVED:
            return [wire.BlockRemoved(block_hashes=hashes, medium=rec.medium)]
        return self._stored_events(rec, hashes)

    def _stored_events(self, rec: Record, hashes: list[bytes]) -> list:
        """One BlockStored per chain run: a block continues the run when its parent is the
        block before it in the same namespace (vLLM's events name one parent per event)."""
        ns, keys, parents, has = rec.ns, rec.keys, rec.parents, rec.has_parent
        n = len(hashes)
        cont = np.zeros(n, dtype=bool)
        if n > 1:
            cont[1:] = has[1:] & (ns[1:] == ns[:-1]) & (parents[1:] == keys[:-1]).all(axis=1)
        starts = np.flatnonzero(~cont).tolist() + [n]
        out = []
        for a, b in zip(starts[:-1], starts[1:]):
            parent = parents[a].tobytes() if has[a] else None
            out.append(wire.BlockStored(
                block_hashes=hashes[a:b], parent_block_hash=parent, token_ids=[],
                block_size=self._events.block_tokens(int(ns[a])), lora_id=None,
                medium=rec.medium, lora_name=None))
        return out

    # -- replay and snapshots ------------------------------------------------------------------
    def _answer(self, enc) -> None:
        frames = self._replay.recv_multipart()
        if len(frames) != 3 or frames[1] != b"":
            if frames:
                self._end(frames[0], b"bad request")
            return
        client, _, body = frames
        if body == wire.SNAPSHOT_REQUEST:
            if self._snapshots_in_flight >= _MAX_SNAPSHOTS or self._snapshot is None:
                self._end(client, b"busy")
            else:
                self._snapshots_in_flight += 1
                self._loop.call_soon_threadsafe(self._take_snapshot, client)
            return
        if len(body) != 8:
            self._end(client, b"bad request")
            return
        start = int.from_bytes(body, "big")
        for seq, payload in list(self._buffer):
            if seq >= start:
                self._send_replay(client, wire.seq_bytes(seq), payload)
        self._end(client, b"")

    def _take_snapshot(self, client: bytes) -> None:
        """On the event loop: the table's blocks now, queued behind every earlier change."""
        try:
            blocks = self._snapshot()
        except Exception:
            log.exception("KV events: snapshot failed")
            blocks = None
        self._events.snapshot(client, blocks)

    def _send_snapshot(self, enc, rec: Record) -> None:
        self._snapshots_in_flight -= 1
        if rec.blocks is None:
            self._end(rec.client, b"snapshot failed")
            return
        seq = wire.seq_bytes(self.seq)
        events: list = [wire.AllBlocksCleared()]
        for part in rec.blocks:
            events.extend(self._to_events(_chain_order(part)))
        for i in range(0, len(events), self._max_batch):
            payload = enc.encode(wire.KVEventBatch(ts=time.time(),
                                                   events=events[i:i + self._max_batch]))
            self._send_replay(rec.client, seq, payload)
        self._end(rec.client, b"")

    def _send_replay(self, client: bytes, seq: bytes, payload: bytes) -> None:
        try:
            self._replay.send_multipart((client, b"", self._topic, seq, payload),
                                        flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass        # the client is gone or over its high-water mark: it asks again

    def _end(self, client: bytes, reason: bytes) -> None:
        try:
            self._replay.send_multipart((client, b"", b"", wire.END_SEQ, reason),
                                        flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass


def _chain_order(rec: Record) -> Record:
    """The blocks of a stored record (rows in chain-depth order, parents before children) in
    runs: each block follows its parent's first child, so every path of a prefix tree comes out
    as few contiguous runs (one BlockStored per run instead of one per block), and a run comes
    after the run holding its parent. A block whose parent is not in the record starts a run.
    Vectorized (sorts and pointer jumping): a snapshot of millions of blocks costs no Python
    loop per block."""
    n = len(rec.keys)
    if n < 2:
        return rec
    keys, parents = rec.keys, rec.parents
    rows = np.arange(n)
    by_key = np.lexsort((keys[:, 1], keys[:, 0]))
    pos = np.minimum(np.searchsorted(keys[by_key, 0], parents[:, 0]), n - 1)
    cand = by_key[pos]
    pidx = np.where(rec.has_parent & (keys[cand, 0] == parents[:, 0])
                    & (keys[cand, 1] == parents[:, 1]) & (cand < rows), cand, -1)
    has = pidx >= 0
    first = np.full(n, n, dtype=np.int64)
    np.minimum.at(first, pidx[has], rows[has])
    head = np.where(has & (first[np.where(has, pidx, 0)] == rows), pidx, rows)
    for _ in range(64):                 # pointer jumping: each block's run head
        nxt = head[head]
        if np.array_equal(nxt, head):
            break
        head = nxt
    idx = np.lexsort((rows, head))
    return Record(rec.kind, rec.medium, rec.ns[idx], keys[idx], parents[idx],
                  rec.has_parent[idx])
