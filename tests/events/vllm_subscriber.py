"""A KV-event subscriber that decodes with vLLM's own classes; run in the vLLM environment by
test_vllm_conformance.py. Nothing of kvstore is imported: only vLLM, pyzmq and msgspec.

    python vllm_subscriber.py PUB_ENDPOINT REPLAY_ENDPOINT

Prints one JSON line per decoded batch: {"source": "live" | "snapshot", "seq": n, "events":
[[type, medium, [hash hex...], parent hex | null, block_size, token_ids]]}. Reads commands on
stdin: "snapshot" asks the replay socket for a snapshot (its batches, then {"end": S}); "stop"
exits.
"""
import json
import sys
import threading

import msgspec
import zmq
from vllm.distributed.kv_events import (AllBlocksCleared, BlockRemoved, BlockStored,
                                        KVEventBatch, ZmqEventPublisher)

pub, replay = sys.argv[1], sys.argv[2]
decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
lock = threading.Lock()


def emit(obj) -> None:
    with lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def describe(batch: KVEventBatch) -> list:
    out = []
    for e in batch.events:
        if isinstance(e, BlockStored):
            out.append(["BlockStored", e.medium, [h.hex() for h in e.block_hashes],
                        e.parent_block_hash.hex() if e.parent_block_hash is not None else None,
                        e.block_size, e.token_ids])
        elif isinstance(e, BlockRemoved):
            out.append(["BlockRemoved", e.medium, [h.hex() for h in e.block_hashes], None, 0, []])
        elif isinstance(e, AllBlocksCleared):
            out.append(["AllBlocksCleared", None, [], None, 0, []])
        else:
            raise TypeError(f"not one of vLLM's events: {e!r}")
    return out


def live(ctx) -> None:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(pub)
    emit({"ready": True})
    while True:
        _topic, seq, payload = sub.recv_multipart()
        emit({"source": "live", "seq": int.from_bytes(seq, "big"),
              "events": describe(decoder.decode(payload))})


def snapshot(ctx) -> None:
    req = ctx.socket(zmq.DEALER)
    req.connect(replay)
    req.send_multipart((b"", b"snapshot"))
    last = -1
    while True:
        _, _topic, seq, payload = req.recv_multipart()
        if seq == ZmqEventPublisher.END_SEQ:      # vLLM's own end-of-replay marker
            break
        last = int.from_bytes(seq, "big")
        emit({"source": "snapshot", "seq": last, "events": describe(decoder.decode(payload))})
    req.close(linger=0)
    emit({"end": last})


ctx = zmq.Context()
threading.Thread(target=live, args=(ctx,), daemon=True).start()
for line in sys.stdin:
    if line.strip() == "snapshot":
        snapshot(ctx)
    elif line.strip() == "stop":
        break
