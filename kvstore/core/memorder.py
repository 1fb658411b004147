"""Whether this machine's memory model makes the lock-free shared-memory checks sound.

Two same-host shortcuts check what they read without a lock: a lease-free get proves its copy
by re-reading the slot's generation after the copy (kvstore/core/slotgen.py), and a snapshot
lookup re-reads a bucket's version after its fields (kvstore/core/shmindex.py). Both are
seqlocks whose correctness rests on the order of plain loads and stores between processes:
the reader's copy loads must not be satisfied after its check load, and the daemon's bump must
be visible before its next owner's writes. x86-64's total store order (TSO) gives exactly that
without fences. Arm (aarch64, e.g. Grace Hopper) and POWER do not: loads may be reordered with
later loads, so a torn copy could pass the check. Python exposes no fence to put in between.

So on a machine without TSO the SDK turns both shortcuts off, with a logged reason: lookups go
over gRPC, and every get takes a lease and confirms its release (Acquire/Release, ordered by
the system calls of the RPCs), which is correct on any memory model.

``KVSTORE_MACHINE`` overrides ``platform.machine()`` for this decision (a test, or an operator
who knows better); nothing else reads it.
"""
from __future__ import annotations

import os
import platform

ENV = "KVSTORE_MACHINE"
# Machines whose memory model is TSO (as the seqlocks need): x86 in its 64- and 32-bit names.
TSO_MACHINES = frozenset({"x86_64", "amd64", "x64", "i386", "i486", "i586", "i686", "x86"})


def machine() -> str:
    """The machine name the decision is made for: $KVSTORE_MACHINE, else platform.machine()."""
    return os.environ.get(ENV) or platform.machine()


def lock_free_reads_unsound() -> str | None:
    """None where loads and stores between processes are totally ordered (TSO) and the
    lock-free checks hold; else the reason they do not, to log."""
    m = machine()
    if m.lower() in TSO_MACHINES:
        return None
    return (f"machine {m!r} is not x86 (no total store order): lease-free gets and "
            "snapshot lookups are off, every get takes a lease (Acquire/Release)")
