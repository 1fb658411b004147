"""Choosing a session's data path from what the daemon granted (its first SessionEvent)."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from kvstore.client import cuda, hbm
from kvstore.client.datapath.arena import ArenaMapping, ArenaPath
from kvstore.client.datapath.base import DataPath
from kvstore.client.datapath.hbm import HBMPath
from kvstore.client.datapath.pinned import PinnedPath
from kvstore.client.datapath.stream import StreamPath
from kvstore.core.arena import ArenaError

if TYPE_CHECKING:
    from kvstore.client.sdk import KVClient

log = logging.getLogger("kvstore.client")


def open_datapath(client: "KVClient", grant, *, shared_memory: bool = True,
                  pin_arena: bool | None = None, use_hbm: bool | None = None,
                  copy_pool=None) -> DataPath:
    """The data path for a session whose first event is ``grant`` (a SessionEvent).

    The arena is mapped when the daemon granted it and ``shared_memory`` allows; pinned
    when CUDA is in use (``pin_arena``, see cuda.attach); the HBM pool opened on top when the
    daemon has one and ``use_hbm`` is not False. Any of these failing falls back to the next
    simpler path (one log line each): without the arena, bytes stream over gRPC. Never
    raises for a medium this process cannot use."""
    stream = StreamPath(client, client.max_message_bytes)
    if not (shared_memory and grant.arena.path):
        return stream
    try:
        mapping = ArenaMapping(grant.arena)
    except ArenaError as exc:
        log.info("not mapping the daemon's arena (%s): streaming bytes over gRPC", exc)
        return stream
    pinned = cuda.attach(mapping.arena, mapping.view, pin_arena)
    path: ArenaPath = ArenaPath(mapping, copy_pool) if pinned is None \
        else PinnedPath(mapping, pinned, copy_pool)
    if use_hbm is not False and grant.HasField("hbm"):
        pool = hbm.open_pool(grant.hbm)
        if pool is not None:
            return HBMPath(path, pool)
    return path
