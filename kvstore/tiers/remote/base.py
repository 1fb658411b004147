"""The remote tier's contract with a distributed engine (Mooncake Store, Redis Cluster).

A backend stores framed block values (kvstore.tiers.remote.codec) under string keys and moves
their bytes between the engine and the daemon's DRAM arena — the only data memory the remote
tier touches: a put reads the block from its arena slot, a get writes it into an arena slot.

    attach(arena)                       once, before any other call (Mooncake registers it)
    exists(keys)      -> [bool]         one batched call
    put(keys, headers, offsets, sizes)  -> [bool | None]: stored (or already there) / not (full,
                                        refused) / None: not sent (the key's node is unavailable)
    get_into(keys, offsets, sizes)      -> [header | None | b"" | ReadStatus.FAILED]: the
                                        64-byte header with the block bytes written at
                                        arena[offset:offset+size]; None: no such key; b"": the
                                        complete value was read and is not size+64 bytes (corrupt);
                                        FAILED: no complete value could be read (a transfer
                                        error, a dead node) — a miss, never a verdict on the value
    remove(keys)                        best effort
    ping()            -> bool           cheap health probe (the circuit breaker's half-open call)
    nodes()           -> [(node, circuit, failed calls, keys unavailable)]: engines whose nodes
                                        fail one by one (Redis Cluster); [] where the engine
                                        fails as a whole (Mooncake: its master)
    close()

Every method blocks and is called from the remote tier's bounded thread pool, never from the
event loop. A method raises RemoteError when the engine cannot be reached or answers with an
error for the whole call; per-key outcomes are in the results. Backends are thread-safe.
"""
from __future__ import annotations

import abc
import importlib
import logging
import threading
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger("kvstore.remote")


class RemoteError(RuntimeError):
    """The engine failed a whole call (unreachable, restarting, protocol error)."""


@dataclass(frozen=True)
class RemoteURL:
    scheme: str                       # "mooncake" or "redis"
    hosts: tuple[tuple[str, int], ...]

    def __str__(self) -> str:
        return f"{self.scheme}://" + ",".join(f"{h}:{p}" for h, p in self.hosts)


def parse_remote_url(url: str) -> RemoteURL:
    """``mooncake://HOST:PORT`` (the master) or ``redis://H1:P1,H2:P2,...`` (cluster nodes or
    one node). Raises ValueError with what was expected."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("mooncake", "redis"):
        raise ValueError(f"expected mooncake://HOST:PORT or redis://HOST:PORT[,HOST:PORT...], "
                         f"got {url!r}")
    hosts = []
    for part in rest.strip("/").split(","):
        host, colon, port = part.strip().rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{url!r}: {part!r} is not HOST:PORT")
        hosts.append((host.strip("[]"), int(port)))
    if scheme == "mooncake" and len(hosts) != 1:
        raise ValueError(f"{url!r}: a Mooncake URL names one master, HOST:PORT")
    return RemoteURL(scheme, tuple(hosts))


def import_engine(module: str, extra: str, hint: str = ""):
    """The engine's client module, or RemoteError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RemoteError(f"the {extra} client is not installed ({exc}): pip install "
                          f"'kvstore-offload[{extra}]'{hint}") from None


class LazyClient(Generic[T]):
    """The one engine client a backend holds, made on first use and made again after
    :meth:`reset`: a daemon starts while its engine is down and joins when it comes up, and a
    call that found the engine gone makes the next one connect afresh. Thread-safe: the
    remote tier's pool threads share it; one of them connects, the others wait for it.

    ``connect()`` returns a ready client or raises RemoteError; ``disconnect(client)`` closes
    one (its errors are logged, never raised: the client is being dropped)."""

    def __init__(self, connect: Callable[[], T], disconnect: Callable[[T], None]):
        self._connect = connect
        self._disconnect = disconnect
        self._lock = threading.Lock()
        self._client: T | None = None

    def get(self) -> T:
        c = self._client
        if c is not None:
            return c
        with self._lock:
            if self._client is None:
                self._client = self._connect()
            return self._client

    def reset(self) -> None:
        """Drop the client (if any); the next :meth:`get` connects again."""
        with self._lock:
            c, self._client = self._client, None
        if c is not None:
            try:
                self._disconnect(c)
            except Exception as exc:
                log.debug("closing a dropped engine client: %r", exc)

    close = reset


class RemoteBackend(abc.ABC):
    name: str = ""

    @abc.abstractmethod
    def attach(self, arena_buffer: memoryview) -> None: ...

    @abc.abstractmethod
    def exists(self, keys: list[str]) -> list[bool]: ...

    @abc.abstractmethod
    def put(self, keys: list[str], headers: list[bytes], offsets: list[int],
            sizes: list[int]) -> list[bool]: ...

    @abc.abstractmethod
    def get_into(self, keys: list[str], offsets: list[int],
                 sizes: list[int]) -> list[bytes | None]: ...

    @abc.abstractmethod
    def remove(self, keys: list[str]) -> None: ...

    @abc.abstractmethod
    def ping(self) -> bool: ...

    def nodes(self) -> list[tuple[str, str, int, int]]:
        return []

    @abc.abstractmethod
    def close(self) -> None: ...
