"""The kv-aware router's knowledge: Dynamo's KV router index (``dynamo.llm.RadixTree``, through
kvstore.events.dynamo.DynamoIndex) fed with every host daemon's KV events — never by asking the
daemons. Each host is a Dynamo worker (its index in the fleet); it starts from the daemon's
snapshot (replay socket) and follows its live stream, gaps filled by replay.

The index sees a store once the daemon has published it and :meth:`poll` has taken it in: a
router acting on it lags the daemons by the events in flight, as a real one does.
"""
from __future__ import annotations

from typing import Sequence


class EventIndex:
    """PrefixIndex (kvstore.bench.trace.routing) over the hosts' event streams."""

    def __init__(self, endpoints: Sequence[tuple[str, str]]):
        """``endpoints``: per host, (PUB endpoint, replay endpoint)."""
        from kvstore.events.dynamo import DynamoIndex
        self._index = DynamoIndex()
        self.hosts = len(endpoints)
        self.batches_applied = 0
        try:
            for worker, (pub, replay) in enumerate(endpoints):
                self._index.add_daemon(worker, pub, replay)
        except BaseException:
            self._index.close()
            raise

    def poll(self) -> None:
        """Take in every event batch that has arrived (never waits)."""
        self.batches_applied += self._index.pump(0.0)

    def overlaps(self, keys: Sequence[bytes], hash_ids: Sequence[int]) -> list[int]:
        from kvstore.events.dynamo import hashes_of_keys
        found = self._index.find_matches(hashes_of_keys(keys))
        return [found.get(h, 0) for h in range(self.hosts)]

    @property
    def orphans(self) -> int:
        """Stored blocks the index left out: it did not hold their parent."""
        return self._index.orphans

    @property
    def rejected(self) -> int:
        """Events Dynamo's tree refused."""
        return self._index.rejected

    def gaps(self) -> int:
        return sum(self._index.subscriber(h).gaps for h in range(self.hosts))

    def close(self) -> None:
        self._index.close()
