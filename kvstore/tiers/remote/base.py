"""The remote tier's contract with a distributed engine (Mooncake Store, Redis Cluster).

A backend stores framed block values (kvstore.tiers.remote.codec) under string keys and moves
their bytes between the engine and the daemon's DRAM arena — the only data memory the remote
tier touches: a put reads the block from its arena slot, a get writes it into an arena slot.

    attach(arena)                       once, before any other call (Mooncake registers it)
    exists(keys)      -> [bool]         one batched call
    put(keys, headers, offsets, sizes)  -> [bool]: stored (or already there) / not (full, refused)
    get_into(keys, offsets, sizes)      -> [header | None | b""]: the 64-byte header with the
                                        block bytes written at arena[offset:offset+size]; None:
                                        no such key; b"": a value of the wrong size (corrupt)
    remove(keys)                        best effort
    ping()            -> bool           cheap health probe (the circuit breaker's half-open call)
    close()

Every method blocks and is called from the remote tier's bounded thread pool, never from the
event loop. A method raises RemoteError when the engine cannot be reached or answers with an
error for the whole call; per-key outcomes are in the results. Backends are thread-safe.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass


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

    @abc.abstractmethod
    def close(self) -> None: ...
