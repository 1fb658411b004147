"""Writers that may still touch a slot: when a quarantined slot may be reused.

A same-host client writes a put's bytes straight into arena slots (and an HBM fill straight
into pool slots). When its allocation ends without a commit — it expired, or the session ended
(the client closed or died) — the daemon cannot know that the client stopped copying: a copy
paused mid-way (a stopped process, a thread the client gave up waiting for, a view the user
kept) may land later. So those slots are *quarantined*: held back from reuse until the writer
provably cannot write any more.

Proof, for a writer the daemon could watch (:class:`WriterProcess`: the client reported its pid,
the daemon sees that pid in its own pid namespace, and that process mapped the arena when the
session first wrote): the process exited (a pidfd, so a reused pid is never mistaken for it),
or it no longer maps the files the slots live in (``/proc/<pid>/maps``: the arena, the HBM
host pool; a CUDA pool's IPC mapping cannot be seen there, so HBM slots of a CUDA pool wait for
the exit). A writer that could not be watched (no pid, a pid in another pid namespace, not
mapping the arena) gets a bound instead of a proof: its slots come back ``hold_s`` after its
session ended.

Pure policy over the OS: the store owns the held slots (kvstore.store.blockstore) and asks
:meth:`WriterProcess.can_write` on its periodic expiry pass.
"""
from __future__ import annotations

import logging
import os
import select
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("kvstore.store.writers")

FileId = tuple[int, int]     # (st_dev, st_ino) of a mapped file


def file_id(path: str | Path) -> FileId | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def mapped(pid: int, files: set[FileId]) -> bool | None:
    """Whether process ``pid`` maps any of ``files`` now; None if its maps cannot be read
    (no such process here, or not ours to inspect)."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            text = f.read()
    except OSError:
        return None
    inodes = {str(ino).encode(): dev for dev, ino in files}
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        dev = inodes.get(parts[4])
        if dev is None:
            continue
        major, _, minor = parts[3].partition(b":")
        if os.makedev(int(major, 16), int(minor, 16)) == dev:
            return True
    return False


class WriterProcess:
    """A client process seen mapping the daemon's shared files, watched through a pidfd."""

    def __init__(self, pid: int, pidfd: int, files: set[FileId]):
        self.pid = pid
        self._fd = pidfd
        self._files = files

    @classmethod
    def watch(cls, pid: int, files: set[FileId]) -> "WriterProcess | None":
        """The watcher of ``pid`` if that process exists here and maps one of ``files`` now;
        None otherwise (the caller then holds its slots for a bounded time)."""
        if pid <= 0 or not files or not hasattr(os, "pidfd_open"):
            return None
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return None
        w = cls(pid, fd, files)
        # the maps must be read from the process the pidfd names: it must still run after
        if mapped(pid, files) and not w.exited():
            return w
        w.close()
        return None

    def exited(self) -> bool:
        if self._fd < 0:
            return True
        p = select.poll()
        p.register(self._fd, select.POLLIN)
        return bool(p.poll(0))

    def can_write(self, needs_exit: bool = False) -> bool:
        """False once the process provably cannot write the slots: it exited or (unless
        ``needs_exit``: slots whose mapping cannot be seen) it maps none of the files."""
        if self.exited():
            return False
        if needs_exit:
            return True
        still = mapped(self.pid, self._files)
        # read after the exit check: a pid reused since then maps nothing of ours anyway
        return bool(still) and not self.exited()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass
class HeldSlots:
    """The quarantined slots of one ended session, until its writer cannot write them."""
    session_id: int
    pid: int
    writer: WriterProcess | None        # None: not watchable, held until ``until``
    until: float                        # monotonic; inf for a watched writer
    dram: list[int] = field(default_factory=list)
    hbm: list[int] = field(default_factory=list)
