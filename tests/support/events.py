"""KV events in tests: free endpoints, daemon flags, and TierView — what a router would believe
each tier holds, rebuilt from a daemon's stream and checked event by event."""
from __future__ import annotations

import time

from support.net import free_port


def endpoints() -> tuple[str, str]:
    """(PUB endpoint, replay endpoint) on free loopback ports."""
    return f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"


def event_args(pub: str, replay: str = "", *extra: str) -> list[str]:
    args = ["--kv-events-endpoint", pub]
    if replay:
        args += ["--kv-events-replay-endpoint", replay]
    return [*args, *extra]


class TierView:
    """Blocks per medium as the events say. Strict: a block stored twice in one medium, or
    removed from a medium that does not hold it, is an AssertionError (the stream is wrong)."""

    def __init__(self):
        self.media: dict[str, set[bytes]] = {}
        self.parents: dict[bytes, bytes | None] = {}
        self.cleared = 0

    def apply(self, kind: str, medium: str | None, hashes: list[bytes],
              parent: bytes | None = None) -> None:
        if kind == "AllBlocksCleared":
            self.media.clear()
            self.cleared += 1
            return
        held = self.media.setdefault(medium, set())
        if kind == "BlockStored":
            for i, h in enumerate(hashes):
                assert h not in held, f"{h.hex()} stored twice in {medium}"
                held.add(h)
                self.parents[h] = parent if i == 0 else hashes[i - 1]
        elif kind == "BlockRemoved":
            for h in hashes:
                assert h in held, f"{h.hex()} removed from {medium}, which did not hold it"
                held.discard(h)
        else:
            raise AssertionError(f"unknown event {kind}")

    def apply_batch(self, batch) -> None:
        for e in batch.events:
            self.apply(type(e).__name__, getattr(e, "medium", None),
                       list(getattr(e, "block_hashes", [])), getattr(e, "parent_block_hash", None))

    def held(self, medium: str) -> set[bytes]:
        return set(self.media.get(medium, ()))


def follow(sub, view: TierView, until, timeout_s: float = 20.0) -> None:
    """Apply ``sub``'s batches to ``view`` until ``until()`` holds (AssertionError on timeout)."""
    deadline = time.monotonic() + timeout_s
    while not until():
        assert time.monotonic() < deadline, "the event stream never reached the expected state"
        for _, batch in sub.poll(0.1):
            view.apply_batch(batch)


def truth(ns, keys: list[bytes]) -> dict[str, set[bytes]]:
    """Per medium, which of ``keys`` the daemon holds now, asked one key at a time (lookup
    names the fastest tier; with write_through every stored block is also on SSD)."""
    out = {"CPU": set(), "STORAGE": set()}
    for k in keys:
        r = ns.lookup([k])
        if r.num_cached:
            out["STORAGE"].add(k)
            if r.tiers[0] == "DRAM":
                out["CPU"].add(k)
    return out
