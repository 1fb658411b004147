"""The router side of kvstore's KV events: a subscriber that never applies a batch out of order.

    sub = EventSubscriber("tcp://127.0.0.1:5557", replay_endpoint="tcp://127.0.0.1:5558")
    sub.sync()                                  # a snapshot: the daemon's whole content
    while True:
        for seq, batch in sub.poll(timeout_s=1.0):
            for event in batch.events:          # kvstore.events.wire structs
                index.apply(event)              # AllBlocksCleared: forget this daemon's blocks

Contract of :meth:`EventSubscriber.poll`: batches come back in sequence order, each once. When a
sequence number is missing it asks the replay socket for the missed batches; if the replay
cannot fill the gap (the batch was dropped, or has left the replay buffer) it asks for a
snapshot and returns its batches (first event ``AllBlocksCleared``, all tagged with the snapshot's
sequence number S), then continues from S + 1. Without a replay endpoint a gap is only counted
(:attr:`gaps`) and the stream continues. ``snapshots`` counts snapshots applied.

Needs pyzmq and msgspec (``pip install 'kvstore-offload[events]'``).
"""
from __future__ import annotations

import time

import zmq

from kvstore.events import wire


class EventSubscriber:
    def __init__(self, endpoint: str, replay_endpoint: str = "", topic: str = "",
                 request_timeout_s: float = 5.0):
        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._sub.connect(endpoint)
        self._replay_endpoint = replay_endpoint
        self._timeout_ms = int(request_timeout_s * 1000)
        self.next_seq: int | None = None     # the sequence number expected next
        self.gaps = 0                        # gaps seen on the live stream
        self.snapshots = 0

    def close(self) -> None:
        self._sub.close(linger=0)
        self._ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the live stream ----------------------------------------------------------------------
    def sync(self) -> list[tuple[int, wire.KVEventBatch]]:
        """Rebuild from nothing: the daemon's snapshot, after which :meth:`poll` continues
        from the snapshot's sequence number + 1. Needs the replay endpoint."""
        seq, batches = self.snapshot()
        self.next_seq = seq + 1
        return [(seq, b) for b in batches]

    def poll(self, timeout_s: float = 0.0, max_batches: int = 1000
             ) -> list[tuple[int, wire.KVEventBatch]]:
        """The batches to apply now, in order (waits up to ``timeout_s`` for the first)."""
        out: list[tuple[int, wire.KVEventBatch]] = []
        wait_ms = int(timeout_s * 1000)
        while len(out) < max_batches and self._sub.poll(wait_ms):
            wait_ms = 0
            _topic, seq_frame, payload = self._sub.recv_multipart()
            seq = wire.seq_of(seq_frame)
            if self.next_seq is not None and seq < self.next_seq:
                continue                           # already applied (replayed or snapshot)
            if self.next_seq is not None and seq > self.next_seq:
                self.gaps += 1
                out.extend(self._fill(seq))
                if seq < self.next_seq:
                    continue                       # the snapshot already covers it
            out.append((seq, wire.decode_batch(payload)))
            self.next_seq = seq + 1
        return out

    def _fill(self, upto: int) -> list[tuple[int, wire.KVEventBatch]]:
        """Batches next_seq .. upto-1 from the replay buffer, or a snapshot when it cannot."""
        if not self._replay_endpoint:
            self.next_seq = upto
            return []
        got = [(s, p) for s, p in self.replay(self.next_seq) if s < upto]
        want = list(range(self.next_seq, upto))
        if [s for s, _ in got] == want:
            self.next_seq = upto
            return [(s, wire.decode_batch(p)) for s, p in got]
        seq, batches = self.snapshot()
        self.next_seq = seq + 1
        return [(seq, b) for b in batches]

    # -- the replay socket ------------------------------------------------------------------------
    def _request(self, body: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
        """Send one request on a fresh DEALER; the (seq, payload) answers and the END reason."""
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self._replay_endpoint)
        try:
            sock.send_multipart((b"", body))
            out = []
            while True:
                if not sock.poll(self._timeout_ms):
                    raise TimeoutError(f"no answer from {self._replay_endpoint} "
                                       f"in {self._timeout_ms} ms")
                frames = sock.recv_multipart()
                _, _topic, seq_frame, payload = frames
                if seq_frame == wire.END_SEQ:
                    return out, payload
                out.append((wire.seq_of(seq_frame), payload))
        finally:
            sock.close(linger=0)

    def replay(self, start_seq: int) -> list[tuple[int, bytes]]:
        """Every buffered batch with seq >= start_seq, as (seq, payload)."""
        out, _ = self._request(start_seq.to_bytes(8, "big"))
        return out

    def snapshot(self, retries: int = 20) -> tuple[int, list[wire.KVEventBatch]]:
        """(S, batches): every block the daemon holds, per tier, as of batch S."""
        for _ in range(retries):
            out, reason = self._request(wire.SNAPSHOT_REQUEST)
            if not reason:
                self.snapshots += 1
                seq = out[0][0] if out else -1
                return seq, [wire.decode_batch(p) for _, p in out]
            time.sleep(0.1)             # busy: other snapshots in flight
        raise RuntimeError(f"snapshot refused by {self._replay_endpoint}: {reason.decode()}")
