"""The SSD tier's on-disk format: directory layout, superblock, segment and slot headers.

Layout of ``--ssd-dir``::

    superblock        magic, format version, segment size (refused if incompatible), checksum
    superblock.copy   the same again: either restores the other; with both damaged the
                      superblock is rebuilt from the segment files (their size, their headers)
    seg-00000.slab    one preallocated file per segment (``segment_bytes`` each)
    journal           the index journal (see kvstore/tiers/ssd/journal.py)

Format 2 makes the slab files self-describing, so the index can be rebuilt from them alone when
the journal is lost or damaged (``SlabFiles.scan``)::

    segment file   [segment header, 4 KiB][slot 0][slot 1]...
    segment header magic, format version, segment number, slot size, sequence number of the
                   assignment, xxh3-64 over all of it
    slot           [slot header, 4 KiB][payload, slot_bytes]
    slot header    magic, format version, address, key, payload length, payload checksum,
                   sequence number, slot size, an opaque tag (the namespace record, parent key,
                   depth: kvstore.tiers.ssd.recovery.SLOT_TAG), xxh3-64 over the whole 4 KiB seeded
                   with the key

The header is one O_DIRECT block (4 KiB) written in the same pwritev as the payload. Sequence
numbers are a hybrid clock (max of wall-clock ns and last + 1, floored at startup by everything
recovered): when two slots claim one key the newer wins, and a slot header older than its
segment's assignment is a leftover of another slot size (free).

A slot address is ``segment << SLOT_BITS | slot`` (kvstore.tiers.ssd.files.SlabFiles hands them
out). Every block carries an xxh3-64 checksum of its bytes, seeded with its key
(:func:`block_checksum`).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import xxhash

from kvstore.core.keys import KEY_BYTES

FORMAT_VERSION = 2
_MAGIC = b"KVSTSSD\x00"
ALIGN = 4096
HEADER_BYTES = ALIGN          # slot header and segment header: one O_DIRECT block each
_SLOT_MAGIC = b"KVSLOT\x00\x02"
_SEG_MAGIC = b"KVSSEG\x00\x02"
# magic | header checksum | version | tag length | payload length | addr | key | payload
# checksum | seq | slot bytes, then the tag, then zeros. The checksum covers every byte of the
# 4 KiB header after itself.
_SLOT_HDR = struct.Struct("<8sQHHIQ16sQQQ")
# magic | header checksum | version | segment | slot bytes | seq
_SEG_HDR = struct.Struct("<8sQHxxxxxxQQQ")
MAX_TAG_BYTES = HEADER_BYTES - _SLOT_HDR.size
SLOT_BITS = 32


class SSDFormatError(RuntimeError):
    """The SSD directory was written by an incompatible format, or is not a kvstore directory."""


def block_checksum(data, key: bytes) -> int:
    """xxh3-64 of the block bytes, seeded with the key: a slot holding another block's bytes
    fails verification even if those bytes are intact.

    Large writable buffers (arena slots: every block the tier moves) are hashed by the system
    libxxhash through ctypes, which releases the GIL for the call: python-xxhash holds it, and
    on a busy daemon the I/O threads then queue behind the event loop for every block. Same
    function, same value (checked when the library is loaded); python-xxhash otherwise."""
    seed = int.from_bytes(key[:8], "little")
    if _xxh3_seeded is not None and len(data) >= _RELEASE_GIL_BYTES:
        try:
            ptr = ctypes.c_char.from_buffer(data)
        except TypeError:          # read-only (bytes): hashed with the GIL held
            pass
        else:
            try:
                return _xxh3_seeded(ctypes.addressof(ptr), len(data), seed)
            finally:
                del ptr            # drop the buffer export at once (an mmap may be closed)
    return xxhash.xxh3_64_intdigest(data, seed=seed)


# Below this a ctypes call costs more than the GIL hand-off it saves.
_RELEASE_GIL_BYTES = 64 << 10


def _load_xxh3():
    """XXH3_64bits_withSeed from the system libxxhash (0.8+: XXH3's output is frozen since
    0.8.0), or None. Kept only if it agrees with python-xxhash on a sample."""
    name = ctypes.util.find_library("xxhash") or "libxxhash.so.0"
    try:
        fn = ctypes.CDLL(name).XXH3_64bits_withSeed
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_uint64
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64)
    sample = bytearray(os.urandom(3 * _RELEASE_GIL_BYTES + 13))
    seed = 0x9E3779B97F4A7C15
    buf = (ctypes.c_char * len(sample)).from_buffer(sample)
    ok = fn(ctypes.addressof(buf), len(sample), seed) == xxhash.xxh3_64_intdigest(sample, seed=seed)
    del buf
    return fn if ok else None


_xxh3_seeded = _load_xxh3()


def checksum_releases_gil() -> bool:
    """block_checksum hashes large writable buffers with the interpreter lock released (the
    system libxxhash was found and agrees with python-xxhash)."""
    return _xxh3_seeded is not None


@dataclass
class ScannedSlot:
    """A slot whose header verified during ``SlabFiles.scan``."""
    addr: int
    key: bytes
    nbytes: int
    csum: int
    seq: int
    tag: bytes


def slots_per_segment(segment_bytes: int, slot_bytes: int) -> int:
    return max(0, (segment_bytes - HEADER_BYTES) // (slot_bytes + HEADER_BYTES))


def slot_offset(slot: int, slot_bytes: int) -> int:
    """Byte offset of a slot's header in its segment file (its payload follows the header)."""
    return HEADER_BYTES + slot * (slot_bytes + HEADER_BYTES)


def encode_slot_header(addr: int, key: bytes, nbytes: int, csum: int, seq: int,
                       slot_bytes: int, tag: bytes) -> bytes:
    if len(tag) > MAX_TAG_BYTES:
        raise ValueError(f"slot tag of {len(tag)} bytes (at most {MAX_TAG_BYTES})")
    key = key.ljust(KEY_BYTES, b"\0")[:KEY_BYTES]
    body = (_SLOT_HDR.pack(_SLOT_MAGIC, 0, FORMAT_VERSION, len(tag), nbytes, addr, key, csum,
                           seq, slot_bytes)[16:] + tag).ljust(HEADER_BYTES - 16, b"\0")
    return _SLOT_MAGIC + struct.pack("<Q", _hdr_csum(body, key)) + body


def decode_slot_header(raw, addr: int, slot_bytes: int) -> ScannedSlot | None:
    """The header at ``addr`` if it verifies and belongs there (its own address and slot size),
    else None."""
    if len(raw) < HEADER_BYTES or bytes(raw[:8]) != _SLOT_MAGIC:
        return None
    (_, hcsum, version, tag_len, nbytes, h_addr, key, csum, seq,
     h_slot) = _SLOT_HDR.unpack_from(raw, 0)
    if version != FORMAT_VERSION or tag_len > MAX_TAG_BYTES:
        return None
    if _hdr_csum(bytes(raw[16:HEADER_BYTES]), key) != hcsum or h_addr != addr or \
            h_slot != slot_bytes or nbytes > slot_bytes:
        return None
    tag = bytes(raw[_SLOT_HDR.size:_SLOT_HDR.size + tag_len])
    return ScannedSlot(addr, key, nbytes, csum, seq, tag)


def _hdr_csum(body: bytes, key: bytes) -> int:
    return xxhash.xxh3_64_intdigest(body, seed=int.from_bytes(key[:8], "little") ^ 0x5107)


def encode_segment_header(number: int, slot_bytes: int, seq: int) -> bytes:
    body = _SEG_HDR.pack(_SEG_MAGIC, 0, FORMAT_VERSION, number, slot_bytes, seq)[16:]
    return _SEG_MAGIC + struct.pack("<Q", xxhash.xxh3_64_intdigest(body)) + body


def decode_segment_header(raw, number: int) -> tuple[int, int] | None:
    """(slot bytes, seq) of a verified segment header for segment ``number``, else None."""
    if len(raw) < _SEG_HDR.size or bytes(raw[:8]) != _SEG_MAGIC:
        return None
    _, hcsum, version, n, slot_bytes, seq = _SEG_HDR.unpack_from(raw, 0)
    if version != FORMAT_VERSION or n != number or \
            xxhash.xxh3_64_intdigest(bytes(raw[16:_SEG_HDR.size])) != hcsum:
        return None
    return slot_bytes, seq


SUPERBLOCK_COPY = "superblock.copy"


def _superblock_check(meta: dict) -> str:
    body = json.dumps({k: v for k, v in meta.items() if k != "check"}, sort_keys=True)
    return f"{xxhash.xxh3_64_intdigest(body.encode()):016x}"


def read_superblock(path: Path) -> tuple[dict | None, str | None]:
    """(its fields, None) for an intact superblock, else (None, why): "missing", "bad magic",
    "unreadable", "checksum mismatch". One without a checksum (written before superblocks
    carried one) is taken as it reads."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, "missing"
    if not raw.startswith(_MAGIC):
        return None, "bad magic"
    try:
        meta = json.loads(raw[len(_MAGIC):])
    except ValueError:
        return None, "unreadable"
    if not isinstance(meta, dict):
        return None, "unreadable"
    if "check" in meta:
        if meta["check"] != _superblock_check(meta):
            return None, "checksum mismatch"
        del meta["check"]
    return meta, None


def write_superblock(path: Path, meta: dict) -> None:
    """Write a superblock with its checksum atomically (temp file, fsync, rename, fsync dir)."""
    body = dict(meta, check=_superblock_check(meta))
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, _MAGIC + json.dumps(body).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def auto_segment_bytes(capacity_bytes: int) -> int:
    seg = min(max(capacity_bytes // 64, 64 << 20), 16 << 30, max(capacity_bytes, ALIGN))
    return max(ALIGN, seg // ALIGN * ALIGN)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
