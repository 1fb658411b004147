"""Remote keys and the value header: how a kvstore block is named and framed in a shared store.

    key    "kvs1/" + namespace digest (hex) + block key (hex)
    value  64-byte header | block bytes

    header  magic "KVSR" | format version u16 | flags u16 | length u64 | block key (16)
            | namespace digest (16) | xxh3-64 of the block bytes seeded with the key | 8 zero bytes

The format version is in both the key and the header: two kvstore versions with different
formats never find each other's values (different keys), and a value that somehow lands under a
key of this version still fails the header check. A shared store is the likeliest place to meet
a wrong value (another writer, a stale object, a corrupted transfer), so a read is served only
when every header field equals what the reader expects and the checksum of the bytes it
received matches: anything else is CORRUPT, and the caller treats it as a miss and removes it.
Only a value whose complete bytes were read can be CORRUPT: a read the engine failed is FAILED,
never evidence against the value.
"""
from __future__ import annotations

import enum
import struct

import xxhash

FORMAT_VERSION = 1
KEY_PREFIX = f"kvs{FORMAT_VERSION}/"
MAGIC = b"KVSR"
_HEADER = struct.Struct("<4sHHQ16s16sQ8x")
HEADER_BYTES = _HEADER.size
assert HEADER_BYTES == 64


class ReadStatus(enum.IntEnum):
    OK = 0
    MISSING = 1      # the remote has no value under the key
    CORRUPT = 2      # a value is there but is not this block: never served, removed
    # The engine could not deliver the value (a transfer failed, its node is down): a miss,
    # counted as a remote error and read again later; the value is never removed for it (it
    # is most likely intact: right after a replica holder dies, Mooncake fails such reads).
    FAILED = 3


def remote_key(namespace_id: bytes, key: bytes) -> str:
    """The remote store's key of one block (the engines take str keys)."""
    return KEY_PREFIX + namespace_id.hex() + key.hex()


def checksum(key: bytes, data) -> int:
    """xxh3-64 of the block bytes seeded with the block key, as the SSD tier does."""
    return xxhash.xxh3_64_intdigest(data, seed=int.from_bytes(key[:8], "little"))


def encode_header(key: bytes, namespace_id: bytes, data) -> bytes:
    return _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(data), key, namespace_id,
                        checksum(key, data))


def verify(header, key: bytes, namespace_id: bytes, data) -> ReadStatus:
    """OK only if ``header`` frames exactly ``data`` as this block of this namespace.
    ``header`` is what a backend's ``get_into`` answered for the key: None (no value) is
    MISSING, ReadStatus.FAILED (no complete value read) is FAILED; anything else was read
    completely and is judged here: OK or CORRUPT."""
    if header is None:
        return ReadStatus.MISSING
    if header is ReadStatus.FAILED:
        return ReadStatus.FAILED
    if len(header) != HEADER_BYTES:
        return ReadStatus.CORRUPT
    magic, version, flags, length, hkey, hns, csum = _HEADER.unpack(bytes(header))
    if (magic != MAGIC or version != FORMAT_VERSION or flags or length != len(data) or hkey != key
            or hns != namespace_id):
        return ReadStatus.CORRUPT
    return ReadStatus.OK if checksum(key, data) == csum else ReadStatus.CORRUPT
