"""Rebuilding the SSD index from the slab files alone: read every slot header.

Run only when the journal is missing or damaged (kvstore.tiers.ssd.catalog decides). One 4 KiB
read per slot, the segments in parallel on the I/O pool; payloads are not read. A slot whose
header verifies (key-seeded xxh3 over the whole header) and is newer than its segment's
assignment is reported; every other slot is free.
"""
from __future__ import annotations

import mmap
import os
import time

from kvstore.tiers.ssd.format import (HEADER_BYTES, SLOT_BITS, ScannedSlot,
                                      decode_segment_header, decode_slot_header, slot_offset,
                                      slots_per_segment)


def scan_slab_files(files, known_slot_bytes: dict[int, int] | None = None
                    ) -> tuple[list[ScannedSlot], dict]:
    """Read every slot header of every segment (one 4 KiB read per slot, the segments in
    parallel on the I/O pool; payloads are not read) and return the slots whose header
    verifies, plus figures. A segment's slot size comes from its own header, else from
    ``known_slot_bytes`` (the journal's SEG records); a segment with neither is skipped.
    Assigns the segments it finds (``files``: the open kvstore.tiers.ssd.files.SlabFiles)."""
    known = known_slot_bytes or {}
    t0 = time.monotonic()

    def one(seg):
        buf = mmap.mmap(-1, HEADER_BYTES)
        view = memoryview(buf)
        try:
            head = decode_segment_header(view[:os.preadv(seg.fd, [view], 0)], seg.number)
            slot_bytes, seg_seq = head if head else (known.get(seg.number, 0), 0)
            if not slot_bytes or not slots_per_segment(files.segment_bytes, slot_bytes):
                return slot_bytes, [], 0
            found = []
            n = slots_per_segment(files.segment_bytes, slot_bytes)
            for slot in range(n):
                got = os.preadv(seg.fd, [view], slot_offset(slot, slot_bytes))
                s = decode_slot_header(view[:got], (seg.number << SLOT_BITS) | slot,
                                       slot_bytes)
                # Older than the segment's assignment: left over from another slot size.
                if s is not None and s.seq > seg_seq:
                    found.append(s)
            return slot_bytes, found, n
        finally:
            view.release()
            buf.close()

    results = list(files.pool.map(one, files.segments))
    found, headers_read, segments = [], 0, 0
    for seg, (slot_bytes, slots, n) in zip(files.segments, results):
        if slot_bytes and n and files.assign_segment(seg.number, slot_bytes):
            segments += 1
            headers_read += n
            found += slots
    for s in found:
        files.observe_seq(s.seq)
    return found, {"segments": segments, "headers_read": headers_read,
                   "slots_found": len(found), "seconds": time.monotonic() - t0}
