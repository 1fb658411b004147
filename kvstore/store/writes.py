"""The write path: a put, from the allocation to the placement in lower tiers, as one walk
(docs/architecture.md, "The put path"). The servicer decodes a request, calls one method here
and encodes the answer.

    allocate(session, namespace, keys, parent) -> (allocation id, offsets)
        1. clean    with a write-back SSD tier, the dirty blocks the eviction for this batch
                    would take are written to SSD first, awaited off the event loop
                    (BlockStore.clean_room_for)
        2. slots    BlockStore.allocate: the keys already stored are skipped, DRAM room is
                    made, fresh slots are taken and the new blocks are WRITING
    write(...)                          a remote client's bytes streamed into those slots
                                        (same-host clients copy into the arena themselves)
    commit(session, allocation, abort) -> blocks published
        3. publish  BlockStore.commit: the blocks become COMMITTED (visible to lookups, and
                    to same-host readers through the index snapshot)
        4. place    every CommitObserver.on_commit(published ids), once (the cluster tier
                    queues them for its background writer); then the SSD tier's persist,
                    awaited: with write_through the commit answers once the blocks are durable
    delete(namespace, keys) -> blocks deleted, answered once the journal says so
    flush_remote(...)                   wait until blocks are readable from the cluster tier

The tiers are handed in by the composition root (kvstore.daemon.server); this module imports
none of them. Everything runs on the daemon's event loop.
"""
from __future__ import annotations

from typing import Protocol, Sequence

from kvstore.core.errors import FailedPrecondition, InvalidArgument, Reason
from kvstore.store.blockstore import BlockStore

MAX_FLUSH_DEADLINE_S = 600.0     # a FlushRemote holds a handler task: bounded like any wait


class CommitObserver(Protocol):
    """Told of every commit's published blocks (the cluster tier's write queue)."""

    def on_commit(self, bids: list[int]) -> None:
        """These blocks were just published. Called once per commit, on the event loop; must
        not block, and must not raise for its own I/O."""


class DurableTier(Protocol):
    """The SSD tier, as the write path uses it (kvstore.tiers.ssd.tier.SSDTier)."""

    async def persist(self, bids: list[int]) -> None:
        """Write freshly committed blocks as the write policy says; with write_through, return
        once they are durable. Never raises for I/O."""

    async def sync_journal(self) -> None:
        """Return once every journal record written so far is durable."""


class RemoteWrites(Protocol):
    """What the write path asks of the cluster tier (kvstore.tiers.remote)."""
    flush_deadline_s: float

    async def flush(self, namespace_id: bytes, keys_blob: bytes,
                    deadline_s: float) -> tuple[list[bool], bool]: ...


class WritePath:
    def __init__(self, store: BlockStore, *, ssd: DurableTier | None = None,
                 remote: RemoteWrites | None = None, observers: Sequence[CommitObserver] = ()):
        """``ssd``: the SSD tier when configured; ``remote``: the cluster tier when configured
        (flush_remote); ``observers``: told of every commit's blocks, in this order."""
        self.store = store
        self.ssd = ssd
        self.remote = remote
        self.observers = tuple(observers)

    async def allocate(self, session_id: int, namespace_id: bytes, keys_blob: bytes,
                       parent_key: bytes = b"") -> tuple[int, list[int]]:
        """Slots for the keys not yet stored: (allocation id, offsets), as
        BlockStore.allocate answers them. Raises KVStoreError for bad input or no room."""
        # 1. clean: the victims' SSD writes are awaited here, off the event loop, so the
        #    synchronous eviction in step 2 only demotes clean blocks.
        await self.store.clean_room_for(session_id, namespace_id, keys_blob)
        # 2. slots
        return self.store.allocate(session_id, namespace_id, keys_blob, parent_key)

    def write(self, session_id: int, allocation_id: int, first_index: int, data) -> None:
        """Copy streamed block bytes into the allocation's slots (BlockStore.write_remote)."""
        self.store.write_remote(session_id, allocation_id, first_index, data)

    async def commit(self, session_id: int, allocation_id: int, abort: bool = False) -> int:
        """Publish (or abort) an allocation; returns the blocks published. With a
        write_through SSD tier, returns once they are durable."""
        # 3. publish
        published: list[int] = []
        n = self.store.commit(session_id, allocation_id, abort, committed_out=published)
        if published:
            # 4. place
            for o in self.observers:
                o.on_commit(published)
            if self.ssd is not None:
                await self.ssd.persist(published)
        return n

    async def delete(self, namespace_id: bytes, keys_blob: bytes) -> int:
        """Delete these keys' blocks; returns how many were stored. A delete that answered
        stays deleted across a restart: the journal is synced first."""
        n = self.store.delete(namespace_id, keys_blob)
        if self.ssd is not None:
            await self.ssd.sync_journal()
        return n

    async def flush_remote(self, session_id: int, namespace_id: bytes, keys_blob: bytes,
                           deadline_s: float = 0.0) -> tuple[list[bool], bool]:
        """Wait until the blocks are readable from the cluster tier, at most ``deadline_s``
        (0: the tier's default): (placed per key, timed out). Raises FailedPrecondition
        (NOT_ENABLED) without a cluster tier, InvalidArgument for a deadline out of range."""
        remote = self.remote
        if remote is None:
            raise FailedPrecondition("this daemon has no cluster tier (--remote): nothing is "
                                     "placed remotely", Reason.NOT_ENABLED)
        wait_s = deadline_s or remote.flush_deadline_s
        if not 0 <= wait_s <= MAX_FLUSH_DEADLINE_S:
            raise InvalidArgument(f"deadline_s must be in [0, {MAX_FLUSH_DEADLINE_S:g}] s, got "
                                  f"{deadline_s}", Reason.BAD_ARGUMENT)
        self.store.session(session_id)
        return await remote.flush(namespace_id, keys_blob, wait_s)
