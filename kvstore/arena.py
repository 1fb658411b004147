"""The shared-memory arena: the bytes of the DRAM tier, mapped by the daemon and its clients.

The daemon creates one file under /dev/shm (mode 0600), sizes it with fallocate so every page
exists before the first put, and writes a header with a random UUID. A same-host client maps the
same file (MAP_POPULATE, so the first copy does not pay page faults) and checks the UUID against
the one the daemon sent over gRPC: a stale file of an earlier daemon is refused, and the client
falls back to streaming bytes over gRPC.

Offsets handed out by the daemon are relative to the start of the file; the data region starts
after a 4 KiB header page.
"""
from __future__ import annotations

import mmap
import os
import struct
import uuid as uuidlib
from pathlib import Path

HEADER_BYTES = 4096
_MAGIC = b"KVSTARN1"
_HEADER = struct.Struct("<8s16sQQ")  # magic, uuid, total size, owner pid


class ArenaError(RuntimeError):
    pass


def default_shm_dir() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(os.environ.get("TMPDIR", "/tmp"))


def _populate_flags() -> int:
    return getattr(mmap, "MAP_POPULATE", 0)


class Arena:
    """A mapped arena file. Create it with :meth:`create` (daemon) or :meth:`attach` (client)."""

    def __init__(self, path: Path, fd: int, mm: mmap.mmap, uuid: bytes, owner: bool):
        self.path = path
        self.uuid = uuid
        self.size_bytes = len(mm)
        self._fd = fd
        self._mm = mm
        self._owner = owner
        self.buffer = memoryview(mm)

    @classmethod
    def create(cls, size_bytes: int, directory: Path | None = None, prefix: str = "kvstore") -> "Arena":
        directory = Path(directory) if directory else default_shm_dir()
        uid = uuidlib.uuid4().bytes
        path = directory / f"{prefix}-{os.getpid()}-{uid.hex()[:8]}.arena"
        total = HEADER_BYTES + size_bytes
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, total)
            except OSError as exc:
                raise ArenaError(
                    f"cannot reserve {total} bytes for the DRAM arena in {directory}: {exc}. "
                    "Lower --dram-bytes or enlarge /dev/shm."
                ) from exc
            mm = mmap.mmap(fd, total, flags=mmap.MAP_SHARED | _populate_flags())
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        mm[:_HEADER.size] = _HEADER.pack(_MAGIC, uid, total, os.getpid())
        return cls(path, fd, mm, uid, owner=True)

    @classmethod
    def attach(cls, path: str | Path, expected_uuid: bytes, expected_size: int) -> "Arena":
        """Map an existing arena; raises ArenaError if it is not the one the daemon described."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise ArenaError(f"cannot open arena {path}: {exc}") from exc
        try:
            size = os.fstat(fd).st_size
            if size != expected_size or size < HEADER_BYTES:
                raise ArenaError(f"arena {path} is {size} bytes, daemon said {expected_size}")
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _populate_flags())
        except BaseException:
            os.close(fd)
            raise
        magic, uid, total, _pid = _HEADER.unpack(mm[:_HEADER.size])
        if magic != _MAGIC or uid != expected_uuid or total != size:
            mm.close()
            os.close(fd)
            raise ArenaError(f"arena {path} does not belong to this daemon (uuid mismatch)")
        return cls(path, fd, mm, uid, owner=False)

    def view(self, offset: int, nbytes: int) -> memoryview:
        if offset < HEADER_BYTES or offset + nbytes > self.size_bytes:
            raise ArenaError(f"slot [{offset}, {offset + nbytes}) outside the arena")
        return self.buffer[offset:offset + nbytes]

    def close(self) -> None:
        if self._mm is None:
            return
        self.buffer.release()
        try:
            self._mm.close()
        except BufferError:
            # A caller still holds a view (e.g. a tensor over the mapping); the mapping lives on
            # until that view is gone, the file is unlinked below all the same.
            pass
        os.close(self._fd)
        self._mm = None
        if self._owner:
            self.path.unlink(missing_ok=True)


def remove_stale_arenas(directory: Path | None = None, prefix: str = "kvstore") -> list[Path]:
    """Unlink arena files whose owning daemon is gone (a SIGKILLed daemon leaves its file)."""
    directory = Path(directory) if directory else default_shm_dir()
    removed = []
    for path in directory.glob(f"{prefix}-*.arena"):
        try:
            pid = int(path.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid() or _alive(pid):
            continue
        try:
            if path.stat().st_uid != os.getuid():
                continue
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
