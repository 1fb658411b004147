"""Conformance: vLLM's own kv_events classes (vllm.distributed.kv_events, in the vLLM
environment) decode the daemon's stream, and every stored, removed and cleared block they
report matches what this test did through the SDK, per tier — through an eviction DRAM -> SSD,
deletes, and a restart (after which a snapshot rebuilds the view)."""
from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from pathlib import Path

from kvstore.client import KVClient
from support.events import TierView, endpoints, event_args, truth
from support.ssd import LAYOUT, put_chain, ssd_args
from support.vllm import MARKS, VLLM_PY

# No engine (seconds, not minutes), and the subscriber imports no kvstore: any vLLM environment
# will do, even one whose kvstore is another tree's (MARKS' other condition).
pytestmark = [MARKS[1]]
SCRIPT = Path(__file__).with_name("vllm_subscriber.py")


class VLLMSubscriber:
    """vllm_subscriber.py in the vLLM interpreter; its JSON lines arrive on a queue."""

    def __init__(self, pub: str, replay: str):
        self.proc = subprocess.Popen([VLLM_PY, str(SCRIPT), pub, replay], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert self.next(300) == {"ready": True}     # importing vLLM takes a while

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def next(self, timeout_s: float = 20.0) -> dict:
        return self.lines.get(timeout=timeout_s)

    def send(self, cmd: str) -> None:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def close(self):
        if self.proc.poll() is None:
            self.send("stop")
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _apply(view: TierView, events: list) -> None:
    for kind, medium, hashes, parent, block_size, token_ids in events:
        if kind == "BlockStored":
            assert block_size == LAYOUT.block_tokens and token_ids == []
            assert medium in ("CPU", "STORAGE")
        view.apply(kind, medium, [bytes.fromhex(h) for h in hashes],
                   bytes.fromhex(parent) if parent else None)


def _snapshot(sub: VLLMSubscriber) -> tuple[int, TierView]:
    sub.send("snapshot")
    view = TierView()
    while True:
        msg = sub.next()
        if "end" in msg:
            return msg["end"], view
        if msg.get("source") == "snapshot":
            _apply(view, msg["events"])


def _follow(sub: VLLMSubscriber, view: TierView, since: int, until,
            timeout_s: float = 30.0) -> int:
    """Apply live batches after ``since`` in order (a gap is an AssertionError) until
    ``until()``; the last sequence number applied."""
    deadline = time.monotonic() + timeout_s
    while not until():
        msg = sub.next(max(0.1, deadline - time.monotonic()))
        if msg.get("source") != "live" or msg["seq"] <= since:
            continue
        assert msg["seq"] == since + 1, f"gap: {since} -> {msg['seq']}"
        since = msg["seq"]
        _apply(view, msg["events"])
    return since


def test_vllm_decodes_every_tier_change(daemon_factory, tmp_path):
    pub, replay = endpoints()
    d = daemon_factory(*ssd_args(tmp_path / "ssd", "32MiB"), *event_args(pub, replay))
    sub = VLLMSubscriber(pub, replay)
    try:
        seq, view = _snapshot(sub)
        assert view.cleared == 1 and not view.held("CPU")
        with KVClient(d.socket) as client:
            ns = client.namespace("m", LAYOUT)
            a, _ = put_chain(ns, 1, 100)
            seq = _follow(sub, view, seq, lambda: view.held("STORAGE") == set(a))
            assert view.held("CPU") == set(a)
            assert [view.parents[k] for k in a[1:]] == a[:-1]
            b, _ = put_chain(ns, 2, 100)
            c, _ = put_chain(ns, 3, 100)        # past DRAM's 256 blocks: A is demoted
            ns.delete(c[60:])
            want = truth(ns, a + b + c)
            assert set(a) - want["CPU"] and want["STORAGE"] == set(a + b + c[:60])
            seq = _follow(sub, view, seq, lambda: {m: view.held(m) for m in want} == want)

            d.stop()
            d.start()
            # after the restart, vLLM's decoder reads the new stream from AllBlocksCleared
            # on, and a snapshot is the recovered SSD blocks
            deadline = time.monotonic() + 30
            while True:
                msg = sub.next(max(0.1, deadline - time.monotonic()))
                if msg.get("source") == "live" and msg["seq"] > seq + 1:
                    break                                   # the restart shows as a gap
            snap_seq, after = _snapshot(sub)
            assert snap_seq > seq
            want = truth(ns, a + b + c)
            assert want == {"CPU": set(), "STORAGE": set(a + b + c[:60])}
            assert {m: after.held(m) for m in want} == want
            assert all(after.parents[k] == k0 for k0, k in zip(a, a[1:]))
    finally:
        sub.close()
