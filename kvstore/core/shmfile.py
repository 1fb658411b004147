"""Private shared-memory files: the one mechanism under the DRAM arena (kvstore.core.arena), its
slot generations (kvstore.core.slotgen) and its index snapshot (kvstore.core.shmindex).

Life of one file:
- The daemon creates it in the shm directory with :meth:`ShmFile.create`: ``O_EXCL`` (never an
  existing file, never through a planted link), mode 0600 (only the daemon's uid opens it),
  optionally reserved with memory (fallocate), sized, and mapped shared and writable. A failure
  at any step leaves no file behind.
- A same-host client opens it with :meth:`ShmFile.open` (read-only unless it must write) and
  maps it with :meth:`ShmFile.map`; checking that the header names the arena the daemon
  described over gRPC (magic, UUID, size) is the caller's: each format has its own header.
- :meth:`ShmFile.close` unmaps and closes; the process that created the file also unlinks it.
- A daemon killed with SIGKILL leaves its files; the next daemon to start in the same directory
  removes them with :func:`remove_orphans`.

Names (what :func:`remove_orphans` relies on): an arena is ``<prefix>-<pid>-<tag>.arena``, the
pid being its daemon's; a file that belongs to an arena (a *companion*) is named after it,
``<arena>.<suffix>`` (``.slotgen``, ``.index``), and is an orphan once its arena is gone.
"""
from __future__ import annotations

import mmap
import os
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

ARENA_SUFFIX = ".arena"


def arena_path(directory: Path, prefix: str, tag: str) -> Path:
    """Where this process's arena named ``tag`` lives (the pid in the name marks its owner)."""
    return Path(directory) / f"{prefix}-{os.getpid()}-{tag}{ARENA_SUFFIX}"


def companion_path(arena: str | Path, suffix: str) -> Path:
    """The path of the file ``suffix`` (".slotgen", ".index") that belongs to ``arena``."""
    return Path(str(arena) + suffix)


def default_shm_dir() -> Path:
    """/dev/shm when this process may write there, else $TMPDIR (or /tmp)."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(os.environ.get("TMPDIR", "/tmp"))


def populate_flag() -> int:
    """MAP_POPULATE where the platform has it (page tables built at map time), else 0."""
    return getattr(mmap, "MAP_POPULATE", 0)


def free_bytes(directory: Path) -> int | None:
    """Bytes an unprivileged process can still allocate in ``directory``; None if unknown."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class ShmFile:
    """One open shared-memory file and, once mapped, its mapping (:attr:`mm`). The process that
    created it owns it: its :meth:`close` unlinks the file."""

    def __init__(self, path: Path, fd: int, owner: bool):
        self.path = path
        self.fd = fd
        self.owner = owner
        self.mm: mmap.mmap | None = None

    @classmethod
    def create(cls, path: str | Path, size_bytes: int, *, reserve_bytes: int = 0,
               populate: bool = False,
               size_error: Callable[[OSError], Exception] | None = None) -> "ShmFile":
        """Create ``path`` (O_EXCL, mode 0600), back its first ``reserve_bytes`` with memory
        (fallocate), size it to ``size_bytes`` and map all of it shared and writable (with
        ``populate``, page tables built now). Raises OSError (FileExistsError included) as the
        system reports it, except that a failure to reserve or size the file is raised as
        ``size_error(exc)`` when that is given. On any failure the file is removed again."""
        path = Path(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        f = cls(path, fd, owner=True)
        with f.closing_on_error():
            try:
                if reserve_bytes:
                    os.posix_fallocate(fd, 0, reserve_bytes)
                os.ftruncate(fd, size_bytes)
            except OSError as exc:
                if size_error is None:
                    raise
                raise size_error(exc) from exc
            f.map(size_bytes, writable=True, populate=populate)
        return f

    @classmethod
    def open(cls, path: str | Path, error: Callable[[str], Exception], what: str, *,
             writable: bool = False) -> "ShmFile":
        """Open an existing file of another process (read-only unless ``writable``); raises
        ``error("cannot open <what> <path>: <why>")`` when it cannot be opened."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        except OSError as exc:
            raise error(f"cannot open {what} {path}: {exc}") from exc
        return cls(path, fd, owner=False)

    @property
    def size_bytes(self) -> int:
        """The file's current size."""
        return os.fstat(self.fd).st_size

    def pread(self, nbytes: int, offset: int = 0) -> bytes:
        return os.pread(self.fd, nbytes, offset)

    def map(self, size_bytes: int, *, writable: bool, populate: bool = False) -> mmap.mmap:
        """Map the first ``size_bytes`` shared (read-only unless ``writable``; with
        ``populate``, MAP_POPULATE where available); the mapping is also :attr:`mm`."""
        flags = mmap.MAP_SHARED | (populate_flag() if populate else 0)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self.mm = mmap.mmap(self.fd, size_bytes, flags=flags, prot=prot)
        return self.mm

    @contextmanager
    def closing_on_error(self) -> Iterator["ShmFile"]:
        """Close (and, for the owner, remove) the file if the block raises: for the checks
        between opening a file and handing it to its user."""
        try:
            yield self
        except BaseException:
            self.close()
            raise

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        """Unmap, close, and unlink the file if this process created it. A view still exported
        from the mapping (a tensor over it) keeps the mapping alive until the view goes; the
        descriptor is closed and the file unlinked all the same. Idempotent."""
        if self.fd < 0:
            return
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:
                pass
            self.mm = None
        os.close(self.fd)
        self.fd = -1
        if self.owner:
            self.path.unlink(missing_ok=True)


# An arena's companion files (slot generations, index snapshot) start with this header.
COMPANION_HEADER = struct.Struct("<8s16sQ")   # magic, arena uuid, entry count


def create_companion(path: str | Path, magic: bytes, arena_uuid: bytes, count: int,
                     size_bytes: int) -> ShmFile:
    """Create (0600, O_EXCL) and map a companion file of arena ``arena_uuid``, header written."""
    file = ShmFile.create(path, size_bytes)
    file.mm[:COMPANION_HEADER.size] = COMPANION_HEADER.pack(magic, arena_uuid, count)
    return file


def attach_companion(path: str | Path, error: Callable[[str], Exception], what: str,
                     magic: bytes | tuple[bytes, ...], arena_uuid: bytes, min_bytes: int,
                     needs_bytes: Callable[[int], int]) -> tuple[ShmFile, int]:
    """Map a companion file of arena ``arena_uuid`` read-only; returns (file, entry count).
    ``magic``: the one accepted, or a tuple of them (the versions this reader knows).
    Raises ``error`` when it cannot be opened, is shorter than ``min_bytes``, or is not this
    arena's (magic, uuid, or shorter than ``needs_bytes(count)``)."""
    magics = magic if isinstance(magic, tuple) else (magic,)
    file = ShmFile.open(path, error, what)
    with file.closing_on_error():
        size = file.size_bytes
        if size < min_bytes:
            raise error(f"{what} {file.path} is truncated")
        mm = file.map(size, writable=False)
        got, uid, count = COMPANION_HEADER.unpack(mm[:COMPANION_HEADER.size])
        if got not in magics or uid != arena_uuid or needs_bytes(count) > size:
            raise error(f"{what} {file.path} belongs to another arena")
    return file, count


def remove_orphans(directory: str | Path | None = None, prefix: str = "kvstore") -> list[Path]:
    """Unlink what daemons that are gone (SIGKILLed) left in ``directory`` (default: the shm
    directory): every ``<prefix>-<pid>-*.arena`` whose pid no longer runs, then every companion
    ``<prefix>-*.arena.<suffix>`` whose arena is not there (any more). Only files owned by this
    uid are touched, never this process's own. Returns the paths removed."""
    directory = Path(directory) if directory else default_shm_dir()
    removed = []
    for path in directory.glob(f"{prefix}-*{ARENA_SUFFIX}"):
        try:
            pid = int(path.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _alive(pid) and _unlink_own(path):
            removed.append(path)
    for path in directory.glob(f"{prefix}-*{ARENA_SUFFIX}.*"):
        if not path.with_suffix("").exists() and _unlink_own(path):
            removed.append(path)
    return removed


def _unlink_own(path: Path) -> bool:
    try:
        if path.stat().st_uid != os.getuid():
            return False
        path.unlink()
    except OSError:
        return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
