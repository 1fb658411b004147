"""A minimal io_uring: vectored reads and writes submitted from one thread, their completions
signalled on an eventfd.

The SSD tier's thread pool pays, per read, a hand-off to a pool thread and back, and each pool
thread takes the interpreter's lock for its Python steps: on a daemon whose event loop is busy,
those hand-offs (context switches and lock waits) cost more CPU than the reads. A ring lets the
event loop's thread queue every read of a get with one system call and learn of their ends
through one eventfd, with no other thread involved.

    ring = Ring.create(entries)      # None where io_uring is unavailable (old kernel, seccomp,
                                     # not x86-64): callers keep their thread pool
    ring.readv(fd, offset, iov, tag) # queue a vectored read; iov: iovecs([(address, length)])
    ring.writev(fd, offset, iov, tag)                 # and a vectored write
    ring.submit()                    # hand the queued requests to the kernel
    ring.completions()               # [(tag, result)] of the requests that ended (result:
                                     # bytes moved, or -errno)
    ring.eventfd                     # readable when requests have ended (watch it on the loop)

Only the thread that owns the ring may call it. The callers keep each iov's memory alive until
its completion comes back. x86-64 only: the ring is shared with the kernel, and the order of
plain loads and stores on x86-64 (TSO) is what the ring's protocol needs; other machines would
need explicit barriers this module does not issue.

No dependency: the `liburing` wheel on PyPI is built for AVX-512 machines and dies with SIGILL
elsewhere, so the ring is set up through ctypes and mapped with mmap (kernel ABI, linux/io_uring.h).
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform

import numpy as np

_SYS_SETUP, _SYS_ENTER, _SYS_REGISTER = 425, 426, 427      # same numbers on every arch
_OFF_SQ_RING, _OFF_CQ_RING, _OFF_SQES = 0, 0x8000000, 0x10000000
_FEAT_SINGLE_MMAP = 1
_ENTER_GETEVENTS = 1
_REGISTER_EVENTFD = 4
_OP_READV, _OP_WRITEV = 1, 2
# IOSQE_ASYNC: the kernel's io-wq workers (threads of this process) issue each request, not the
# submitting thread inside io_uring_enter. The event loop then does not pay for pinning pages
# and building bios, and on a host whose cores are all busy that work gets its own share of
# them instead of queueing behind the loop (2-core VM, both cores spinning: SSD gets at 0.89 and
# 0.68 of raw reads against 0.60 and 0.60 without it; no difference with the cores quiet).
_SQE_FLAGS = 1 << 4
_SQE_BYTES, _CQE_BYTES = 64, 16

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _SQOffsets(ctypes.Structure):
    _fields_ = [("head", ctypes.c_uint32), ("tail", ctypes.c_uint32),
                ("ring_mask", ctypes.c_uint32), ("ring_entries", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("dropped", ctypes.c_uint32),
                ("array", ctypes.c_uint32), ("resv1", ctypes.c_uint32),
                ("user_addr", ctypes.c_uint64)]


class _CQOffsets(ctypes.Structure):
    _fields_ = [("head", ctypes.c_uint32), ("tail", ctypes.c_uint32),
                ("ring_mask", ctypes.c_uint32), ("ring_entries", ctypes.c_uint32),
                ("overflow", ctypes.c_uint32), ("cqes", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("resv1", ctypes.c_uint32),
                ("user_addr", ctypes.c_uint64)]


class _Params(ctypes.Structure):
    _fields_ = [("sq_entries", ctypes.c_uint32), ("cq_entries", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("sq_thread_cpu", ctypes.c_uint32),
                ("sq_thread_idle", ctypes.c_uint32), ("features", ctypes.c_uint32),
                ("wq_fd", ctypes.c_uint32), ("resv", ctypes.c_uint32 * 3),
                ("sq_off", _SQOffsets), ("cq_off", _CQOffsets)]


_SQE = np.dtype({"names": ["opcode", "flags", "ioprio", "fd", "off", "addr", "len", "rw_flags",
                           "user_data"],
                 "formats": [np.uint8, np.uint8, np.uint16, np.int32, np.uint64, np.uint64,
                             np.uint32, np.uint32, np.uint64],
                 "offsets": [0, 1, 2, 4, 8, 16, 24, 28, 32], "itemsize": _SQE_BYTES})
_CQE = np.dtype({"names": ["user_data", "res", "flags"],
                 "formats": [np.uint64, np.int32, np.uint32],
                 "offsets": [0, 8, 12], "itemsize": _CQE_BYTES})


class _Iovecs(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _check(ret: int, what: str) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return ret


class Ring:
    """One io_uring (see the module's docstring). Not thread-safe."""

    def __init__(self, fd: int, params: _Params, maps: list[mmap.mmap], eventfd: int):
        self.fd, self.eventfd = fd, eventfd
        self._maps = maps
        sq_map, cq_map, sqe_map = maps[0], maps[-2] if len(maps) == 3 else maps[0], maps[-1]
        so, co = params.sq_off, params.cq_off
        words_sq = np.frombuffer(sq_map, dtype=np.uint32)
        words_cq = np.frombuffer(cq_map, dtype=np.uint32)
        self._sq_head = words_sq[so.head // 4:so.head // 4 + 1]
        self._sq_tail = words_sq[so.tail // 4:so.tail // 4 + 1]
        self._sq_mask = int(words_sq[so.ring_mask // 4])
        self.entries = int(words_sq[so.ring_entries // 4])
        self._sq_array = words_sq[so.array // 4:so.array // 4 + self.entries]
        self._cq_head = words_cq[co.head // 4:co.head // 4 + 1]
        self._cq_tail = words_cq[co.tail // 4:co.tail // 4 + 1]
        self._cq_mask = int(words_cq[co.ring_mask // 4])
        cq_entries = int(words_cq[co.ring_entries // 4])
        self._cqes = np.frombuffer(cq_map, dtype=_CQE, count=cq_entries, offset=co.cqes)
        self._sqes = np.frombuffer(sqe_map, dtype=_SQE, count=self.entries)
        self._sq_array[:] = np.arange(self.entries, dtype=np.uint32)   # slot i: SQE i
        self._tail = int(self._sq_tail[0])          # ours: queued, not yet submitted past it
        self._unsubmitted = 0
        self.in_flight = 0                          # submitted or queued, not completed

    @classmethod
    def create(cls, entries: int = 256) -> "Ring | None":
        """A ring of ``entries`` submission slots with an eventfd, or None where io_uring
        cannot be used here (the reason is not an error: callers fall back)."""
        if platform.machine() not in ("x86_64", "AMD64") or not hasattr(os, "eventfd"):
            return None
        p = _Params()
        fd = _libc.syscall(_SYS_SETUP, ctypes.c_uint(entries), ctypes.byref(p))
        if fd < 0:
            return None      # ENOSYS (old kernel), EPERM (seccomp, io_uring_disabled), ENOMEM
        maps: list[mmap.mmap] = []
        efd = -1
        try:
            so, co = p.sq_off, p.cq_off
            sq_bytes = so.array + p.sq_entries * 4
            cq_bytes = co.cqes + p.cq_entries * _CQE_BYTES
            prot = mmap.PROT_READ | mmap.PROT_WRITE
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            if p.features & _FEAT_SINGLE_MMAP:
                maps.append(mmap.mmap(fd, max(sq_bytes, cq_bytes), flags, prot,
                                      offset=_OFF_SQ_RING))
            else:
                maps.append(mmap.mmap(fd, sq_bytes, flags, prot, offset=_OFF_SQ_RING))
                maps.append(mmap.mmap(fd, cq_bytes, flags, prot, offset=_OFF_CQ_RING))
            maps.append(mmap.mmap(fd, p.sq_entries * _SQE_BYTES, flags, prot,
                                  offset=_OFF_SQES))
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            arg = ctypes.c_int32(efd)
            _check(_libc.syscall(_SYS_REGISTER, fd, _REGISTER_EVENTFD, ctypes.byref(arg), 1),
                   "io_uring_register(EVENTFD)")
        except (OSError, ValueError):
            for m in maps:
                m.close()
            if efd >= 0:
                os.close(efd)
            os.close(fd)
            return None
        return cls(fd, p, maps, efd)

    @property
    def free(self) -> int:
        """Reads that can be queued now without overrunning the rings."""
        return max(0, self.entries - self.in_flight)

    def readv(self, fd: int, offset: int, iov: "ctypes.Array", tag: int) -> None:
        """Queue a vectored read into ``iov`` (an array made by :func:`iovecs`, kept alive by
        the caller until the completion) at ``offset`` of ``fd``; ``tag`` comes back with its
        result. The caller checks :attr:`free` first."""
        self._queue(_OP_READV, fd, offset, iov, tag)

    def writev(self, fd: int, offset: int, iov: "ctypes.Array", tag: int) -> None:
        """Queue a vectored write of ``iov`` at ``offset`` of ``fd``, as readv."""
        self._queue(_OP_WRITEV, fd, offset, iov, tag)

    def _queue(self, op: int, fd: int, offset: int, iov: "ctypes.Array", tag: int) -> None:
        if self.in_flight >= self.entries:
            raise OSError(errno.EBUSY, "io_uring submission queue is full")
        sqe = self._sqes[self._tail & self._sq_mask]
        sqe["opcode"], sqe["flags"], sqe["ioprio"], sqe["fd"] = op, _SQE_FLAGS, 0, fd
        sqe["off"], sqe["addr"], sqe["len"] = offset, ctypes.addressof(iov), len(iov)
        sqe["rw_flags"], sqe["user_data"] = 0, tag
        self._tail = (self._tail + 1) & 0xFFFFFFFF
        self._unsubmitted += 1
        self.in_flight += 1

    def submit(self) -> None:
        """Hand every queued read to the kernel (one system call)."""
        n = self._unsubmitted
        if not n:
            return
        self._sq_tail[0] = self._tail        # after the SQEs: x86-64 keeps stores in order
        while n:
            done = _libc.syscall(_SYS_ENTER, self.fd, n, 0, 0, None, 0)
            if done < 0:
                e = ctypes.get_errno()
                if e in (errno.EINTR, errno.EAGAIN, errno.EBUSY):
                    continue
                raise OSError(e, f"io_uring_enter: {os.strerror(e)}")
            n -= done
        self._unsubmitted = 0

    def unsubmitted(self) -> list[int]:
        """After submit raised: the tags of the reads the kernel has not taken (it never will:
        no more submits may follow). The ring is unusable for new reads from here; the reads
        it took still complete through :meth:`completions`."""
        taken = int(self._sq_head[0])
        n = (self._tail - taken) & 0xFFFFFFFF
        tags = [int(self._sqes[(taken + i) & self._sq_mask]["user_data"]) for i in range(n)]
        self.in_flight -= n
        self._unsubmitted = 0
        self.entries = 0                 # free is 0 from now on
        return tags

    def completions(self) -> list[tuple[int, int]]:
        """(tag, result) of every read that ended since the last call; result is the bytes
        read, or -errno. Drains the eventfd first, so a completion that lands meanwhile
        signals it again."""
        try:
            os.eventfd_read(self.eventfd)
        except BlockingIOError:
            pass
        head, tail = int(self._cq_head[0]), int(self._cq_tail[0])
        if head == tail:
            return []
        n = (tail - head) & 0xFFFFFFFF
        idx = (np.arange(head, head + n, dtype=np.uint64) & np.uint64(self._cq_mask)).astype(
            np.int64)
        got = self._cqes[idx]
        out = list(zip(got["user_data"].tolist(), got["res"].tolist()))
        self._cq_head[0] = tail              # after reading them: the kernel may reuse them
        self.in_flight -= n
        return out

    def close(self) -> None:
        if self.fd < 0:
            return
        for m in self._maps:
            try:
                m.close()
            except BufferError:      # a numpy view still exported (process exit frees it)
                pass
        os.close(self.eventfd)
        os.close(self.fd)
        self.fd = -1


def iovecs(pieces: list[tuple[int, int]]) -> "ctypes.Array":
    """A struct iovec array of (address, length) pieces, for Ring.readv."""
    arr = (_Iovecs * len(pieces))()
    for i, (addr, n) in enumerate(pieces):
        arr[i].base, arr[i].len = addr, n
    return arr


def address(view) -> tuple[int, object]:
    """(address, keeper) of a writable buffer: the address stays valid while ``keeper`` lives
    (a numpy view of the same memory, which keeps the buffer exported)."""
    a = np.frombuffer(view, dtype=np.uint8)
    return a.ctypes.data, a
