"""Exclusive lock files: one daemon per socket, one per SSD directory.

``take(path)`` holds an flock on ``path`` (created 0600) with the holder's pid written in it, or
raises LockHeld naming the pid that holds it. The lock dies with its process (a SIGKILLed daemon
leaves no stale lock); ``release`` unlinks the file first, and ``take`` retries when the file it
locked was unlinked meanwhile, so two processes never both hold a lock on one path.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


class LockHeld(RuntimeError):
    """Another process holds the lock; ``pid`` is what it wrote ("unknown" if nothing yet)."""

    def __init__(self, path: Path, pid: str):
        super().__init__(f"{path} is held by pid {pid}")
        self.path = path
        self.pid = pid


def take(path: Path) -> int:
    """The open descriptor holding the lock until closed (see release). Raises LockHeld, or
    OSError when the file cannot be created."""
    path = Path(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockHeld(path, holder) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)      # unlinked by its releasing holder between our open and flock


def release(fd: int, path: Path) -> None:
    """Unlink ``path`` if it is still the file ``fd`` locks, then release the lock."""
    with contextlib.suppress(OSError):
        if os.fstat(fd).st_ino == os.stat(path).st_ino:
            os.unlink(path)
    os.close(fd)
