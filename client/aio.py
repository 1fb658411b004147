"""asyncio face of the SDK: the same operations as coroutines.

    async with AsyncKVClient(socket) as client:
        ns = await client.namespace("llama", layout)
        await ns.put(keys, kv)
        kv = await ns.get(keys)

Bulk copies run on the SDK's I/O threads (as in the sync client) and control calls on the
default executor, so the event loop never blocks on the daemon.
"""
from __future__ import annotations

import asyncio
import functools
from typing import Sequence

from kvstore.client.namespace import LookupResult, Namespace
from kvstore.client.sdk import KVClient
from kvstore.core.layout import KVLayout


async def _in_thread(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))


class AsyncNamespace:
    def __init__(self, ns: Namespace):
        self.sync = ns
        self.layout = ns.layout
        self.namespace_id = ns.namespace_id

    def block_keys(self, token_ids, parent: bytes | None = None) -> list[bytes]:
        return self.sync.block_keys(token_ids, parent)

    async def lookup(self, keys: Sequence[bytes]) -> LookupResult:
        return await _in_thread(self.sync.lookup, keys)

    async def put(self, keys: Sequence[bytes], kv, parent_key: bytes | None = None) -> int:
        return await asyncio.wrap_future(self.sync.put(keys, kv, parent_key))

    async def get(self, keys: Sequence[bytes], out=None):
        return await asyncio.wrap_future(self.sync.get(keys, out))

    async def delete(self, keys: Sequence[bytes]) -> int:
        return await _in_thread(self.sync.delete, keys)

    async def prefetch(self, keys: Sequence[bytes], deadline_s: float = 1.0,
                       grace_s: float = 0.0, to_hbm: bool | None = None):
        """See Namespace.prefetch: a scheduler hint, answered once the daemon queued it."""
        return await _in_thread(self.sync.prefetch, keys, deadline_s, grace_s, to_hbm)

    async def prefetch_many(self, items, grace_s: float = 0.0, to_hbm: bool | None = None):
        return await _in_thread(self.sync.prefetch_many, items, grace_s, to_hbm)

    async def cancel_prefetch(self, tickets) -> int:
        return await _in_thread(self.sync.cancel_prefetch, tickets)


class AsyncKVClient:
    """Takes the same arguments as KVClient; connect with ``await`` or ``async with``."""

    def __init__(self, socket: str | None = None, **kwargs):
        self._args = (socket,)
        self._kwargs = kwargs
        self.sync: KVClient | None = None

    async def connect(self) -> "AsyncKVClient":
        self.sync = await _in_thread(functools.partial(KVClient, *self._args, **self._kwargs))
        return self

    def __await__(self):
        return self.connect().__await__()

    async def namespace(self, model_id: str, layout: KVLayout, tenant: str = "") -> AsyncNamespace:
        return AsyncNamespace(await _in_thread(self.sync.namespace, model_id, layout, tenant))

    async def stats(self):
        return await _in_thread(self.sync.stats)

    async def close(self) -> None:
        if self.sync is not None:
            await _in_thread(self.sync.close)

    async def __aenter__(self) -> "AsyncKVClient":
        return await self.connect()

    async def __aexit__(self, *exc) -> None:
        await self.close()
