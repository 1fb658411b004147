"""Moving block bytes between a caller's tensors and arena slots.

Works with torch tensors (any device torch can copy from/to) and numpy arrays; torch is imported
only when the caller passes a tensor, so the SDK installs without it.
"""
from __future__ import annotations

import contextlib
import sys
import threading

import numpy as np

from kvstore.core.errors import InvalidArgument
from kvstore.core.layout import KVLayout

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "uint8": np.uint8}


def _is_torch(x) -> bool:
    # torch as far as it is imported: another thread may be importing it right now (a client
    # that never did imports it in an I/O thread for its first torch output), and a partly
    # initialised module may have no Tensor yet; then x is no tensor of it
    tensor = getattr(sys.modules.get("torch"), "Tensor", None)
    return tensor is not None and isinstance(x, tensor)


def block_rows(kv, layout: KVLayout, n_blocks: int):
    """A [n_blocks, block_bytes] uint8 view of ``kv`` after checking its shape and dtype."""
    want_shape = (n_blocks, *layout.block_shape)
    if _is_torch(kv):
        dtype = str(kv.dtype).removeprefix("torch.")
        if dtype != layout.dtype:
            raise InvalidArgument(f"kv dtype is {dtype}, the namespace layout says {layout.dtype}")
        if tuple(kv.shape) != want_shape:
            raise InvalidArgument(f"kv shape is {tuple(kv.shape)}, expected {want_shape} "
                                  "([blocks, layers, 2, block_tokens, kv_heads, head_dim])")
        import torch
        return kv.contiguous().view(-1).view(torch.uint8).view(n_blocks, layout.block_bytes)
    arr = np.asarray(kv)
    if layout.dtype in _NUMPY_DTYPES:
        if arr.dtype != _NUMPY_DTYPES[layout.dtype]:
            raise InvalidArgument(f"kv dtype is {arr.dtype}, the namespace layout says {layout.dtype}")
        if arr.shape != want_shape:
            raise InvalidArgument(f"kv shape is {arr.shape}, expected {want_shape}")
    else:  # numpy has no bfloat16/fp8: accept raw bytes of the right size
        if arr.dtype != np.uint8 or arr.size != n_blocks * layout.block_bytes:
            raise InvalidArgument(f"numpy kv for {layout.dtype} must be uint8 of "
                                  f"{n_blocks * layout.block_bytes} bytes, got {arr.dtype} "
                                  f"of {arr.size} elements")
    return np.ascontiguousarray(arr).reshape(-1).view(np.uint8).reshape(n_blocks, layout.block_bytes)


def new_output(layout: KVLayout, n_blocks: int, like: str = "torch"):
    if like == "torch":
        import torch
        return torch.empty((n_blocks, *layout.block_shape), dtype=getattr(torch, layout.dtype))
    if layout.dtype in _NUMPY_DTYPES:
        return np.empty((n_blocks, *layout.block_shape), dtype=_NUMPY_DTYPES[layout.dtype])
    return np.empty((n_blocks, layout.block_bytes), dtype=np.uint8)


def out_rows(out, layout: KVLayout, n_blocks: int):
    """Writable [n_blocks, block_bytes] uint8 view of a caller's output buffer (checked)."""
    if _is_torch(out):
        import torch
        if not out.is_contiguous():
            raise InvalidArgument("out must be contiguous")
        if out.numel() * out.element_size() < n_blocks * layout.block_bytes:
            raise InvalidArgument(f"out holds {out.numel() * out.element_size()} bytes, "
                                  f"{n_blocks} blocks need {n_blocks * layout.block_bytes}")
        return out.view(-1).view(torch.uint8)[: n_blocks * layout.block_bytes].view(
            n_blocks, layout.block_bytes)
    arr = out
    if not isinstance(arr, np.ndarray) or not arr.flags.c_contiguous:
        raise InvalidArgument("out must be a contiguous torch tensor or numpy array")
    flat = arr.reshape(-1).view(np.uint8)
    if flat.size < n_blocks * layout.block_bytes:
        raise InvalidArgument(f"out holds {flat.size} bytes, {n_blocks} blocks need "
                              f"{n_blocks * layout.block_bytes}")
    return flat[: n_blocks * layout.block_bytes].reshape(n_blocks, layout.block_bytes)


def writing_into(t):
    """Context for writing into ``t`` from an SDK thread: an inference tensor (made under
    torch.inference_mode, as engines' forward passes are) may be updated in place only inside
    inference mode, which is per thread."""
    if _is_torch(t) and t.is_inference():
        import torch
        return torch.inference_mode()
    return contextlib.nullcontext()


_PAGE = 4096


class ArenaView:
    """The mapped arena as a flat uint8 torch tensor and numpy array (same memory).

    ``populate(offset, nbytes) -> bool`` (Arena.populate: MADV_POPULATE_WRITE) and
    ``mapped_bytes`` (the prefix already populated at map time) let :meth:`prefault` build this
    mapping's page tables in bulk before the first copy through a slot: a client that
    attached while the daemon was still preparing the arena would otherwise take one page
    fault per 4 KiB on its first copy through each slot (see docs/decisions.md). One byte per
    4 KiB page records what this mapping populated (0.025% of the arena's size)."""

    def __init__(self, buffer: memoryview, populate=None, mapped_bytes: int = 0):
        self.np = np.frombuffer(buffer, dtype=np.uint8)
        self._torch = None
        self._populate = populate
        self._mapped = None
        self._follower: threading.Thread | None = None
        if populate is not None and mapped_bytes < len(self.np):
            self._mapped = np.zeros(-(-len(self.np) // _PAGE), dtype=bool)
            self._mapped[:mapped_bytes // _PAGE] = True

    def follow(self, daemon_populated, piece_bytes: int = 64 << 20,
               poll_s: float = 0.05) -> None:
        """Populate this mapping in the background, in address order, up to what the daemon
        reports populated (``daemon_populated() -> bytes``, the arena header): a client that
        attached while the daemon was preparing the arena then finds its slots mapped by the
        time it copies. Populating only what the daemon populated keeps to reserved memory
        and leaves the slow first touch of memory to the daemon's preparer. One daemon
        thread; :meth:`close` stops it (within one piece) and must precede unmapping."""
        if self._mapped is None or self._follower is not None:
            return
        self._stop = threading.Event()
        self._follower = threading.Thread(target=self._follow, name="kvstore-prefault",
                                          args=(daemon_populated, piece_bytes, poll_s),
                                          daemon=True)
        self._follower.start()

    def _follow(self, daemon_populated, piece_bytes: int, poll_s: float) -> None:
        try:
            self._follow_until_done(daemon_populated, piece_bytes, poll_s)
        except Exception:   # noqa: BLE001 -- an optimisation only: pages then fault in
            pass

    def _follow_until_done(self, daemon_populated, piece_bytes: int, poll_s: float) -> None:
        size, page = len(self.np), _PAGE
        cursor = 0
        while not self._stop.is_set() and cursor < size:
            mapped = self._mapped
            if mapped is None:
                return
            end = min(daemon_populated(), size) // page * page
            if cursor >= end:
                self._stop.wait(poll_s)
                continue
            stop = min(end, cursor + piece_bytes)
            p0, p1 = cursor // page, stop // page
            if not mapped[p0:p1].all():
                if not self._populate(cursor, stop - cursor):
                    return                  # the kernel cannot: pages fault in on first use
                mapped[p0:p1] = True
            cursor = stop

    def close(self) -> None:
        """Stop the background populate (see follow); call before the mapping goes."""
        if self._follower is not None:
            self._stop.set()
            self._follower.join()
            self._follower = None

    def prefault(self, offsets: list[int], indices: list[int], row_bytes: int) -> None:
        """Populate the pages of these slots (one populate per adjacent run) that this
        mapping has not populated yet. Only for slots the daemon handed out: those are
        reserved memory, so populating never allocates a hole. Racing callers may populate a
        run twice: harmless. Where the kernel cannot populate, pages fault in as before."""
        mapped = self._mapped
        if mapped is None or not indices:
            return
        for _, count, start in runs(offsets, [i for i in indices if offsets[i] >= 0],
                                    row_bytes):
            p0 = start // _PAGE
            p1 = -(-(start + count * row_bytes) // _PAGE)
            if mapped[p0:p1].all():
                continue
            if not self._populate(p0 * _PAGE, (p1 - p0) * _PAGE):
                self._mapped = None
                return
            mapped[p0:p1] = True

    @property
    def torch(self):
        if self._torch is None:
            import torch
            self._torch = torch.from_numpy(self.np)
        return self._torch

    def rows_for(self, target):
        return self.torch if _is_torch(target) and target.device.type != "cpu" else self.np


def _as_numpy(x):
    """A numpy view of a CPU tensor/array (no copy), or None for a device tensor."""
    if _is_torch(x):
        return x.numpy() if x.device.type == "cpu" else None
    return x


# glibc's memcpy moves mid-sized blocks with `rep movsb`, which on AMD Zen (FSRM) crawls when
# the destination is 1-31 bytes past the source modulo 64: measured here (AMD EPYC) 2.4-2.8 GB/s
# instead of 27-34 for 64-256 KiB copies, up to where glibc switches to non-temporal stores
# (~1 MiB). A numpy array's data sits 16 bytes into its malloc'd pages, so a get into one from
# the page-aligned arena hits that case every time (puts, arena minus 16, do not). A numpy
# ufunc's vectorized loop has no such case: an identity ufunc (np.positive on integers) copies
# those at 18-24 GB/s.
_SKEW_BYTES = 64
_SKEW_SLOW = 32              # (dst - src) % 64 in [1, _SKEW_SLOW): rep movsb's slow case
_SKEW_MAX_BYTES = 4 << 20    # above this glibc streams (non-temporal stores): no slow case


def _host_copy(d: np.ndarray, s: np.ndarray) -> None:
    """np.copyto(d, s) for two contiguous byte rows, around memcpy's slow relative alignment."""
    skew = (d.ctypes.data - s.ctypes.data) % _SKEW_BYTES
    if (0 < skew < _SKEW_SLOW and d.nbytes <= _SKEW_MAX_BYTES and d.flags.c_contiguous
            and s.flags.c_contiguous and d.dtype == s.dtype == np.uint8):
        d, s = d.reshape(-1), s.reshape(-1)
        if d.nbytes % 8 == 0 and d.ctypes.data % 8 == 0 and s.ctypes.data % 8 == 0:
            d, s = d.view(np.uint64), s.view(np.uint64)
        np.positive(s, out=d)
        return
    np.copyto(d, s)


def copy_rows(dst, src) -> None:
    """dst[...] = src for two byte rows of equal size, torch (any device) or numpy.

    Host-to-host copies go through numpy's memcpy, measured faster here than torch's copy_
    (except at the relative alignments where memcpy crawls: see _host_copy); a device tensor
    on either side goes through torch (a DMA copy)."""
    d, s = _as_numpy(dst), _as_numpy(src)
    if d is not None and s is not None:
        _host_copy(d, s)
        return
    import torch
    d = dst if _is_torch(dst) else torch.from_numpy(dst)
    s = src if _is_torch(src) else torch.from_numpy(np.array(src))
    d.copy_(s, non_blocking=False)


def runs(offsets: list[int], indices: list[int], row_bytes: int) -> list[tuple[int, int, int]]:
    """Group rows into (first index, count, arena offset) runs that are adjacent on both sides.

    Rows i and i+1 of a [n, row_bytes] tensor are adjacent in memory; when their arena slots are
    adjacent too (the slab allocator hands out consecutive slots, and slot == block size for
    4 KiB-multiple blocks) one copy moves the whole run. Fewer, larger copies are faster on both paths: a DMA's launch
    cost is paid once, and on the host a large memcpy streams with non-temporal stores where
    block-sized ones do not (measured here: 2 MiB copies reach ~0.65x of one large copy).
    """
    out: list[tuple[int, int, int]] = []
    for i in indices:
        o = offsets[i]
        if out:
            first, count, start = out[-1]
            if i == first + count and o == start + count * row_bytes:
                out[-1] = (first, count + 1, start)
                continue
        out.append((i, 1, o))
    return out


def torch_missing() -> bool:
    """torch cannot be imported here (views are then numpy arrays)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return True
    return False


def slot_runs(arena_view, offsets: list[int], row_bytes: int) -> list[tuple[int, int, object]]:
    """(first, count, rows) per run of blocks in adjacent slots (see runs): rows a [count,
    row_bytes] uint8 view of the arena (torch; numpy without torch), so a caller moves each run
    with one copy. ``arena_view``: the data path's (``.torch`` and ``.np`` flat views)."""
    base = arena_view.np if torch_missing() else arena_view.torch
    return [(first, count, base[start:start + count * row_bytes].reshape(count, row_bytes))
            for first, count, start in runs(offsets, list(range(len(offsets))), row_bytes)]


def strided_runs(offsets: list[int]) -> list[tuple[int, int, int]]:
    """Split slot offsets into arithmetic runs: (first block index, length, byte stride).

    Unlike ``runs`` (slots adjacent on both sides, so one flat copy moves a run), a run here may
    have any stride: the HF layer loader reads it as one strided view of the arena.
    """
    runs: list[tuple[int, int, int]] = []
    i = 0
    while i < len(offsets):
        j = i + 1
        stride = offsets[j] - offsets[i] if j < len(offsets) else 0
        while j < len(offsets) and offsets[j] - offsets[j - 1] == stride and stride > 0:
            j += 1
        runs.append((i, j - i, stride if j - i > 1 else 0))
        i = j
    return runs


_PIECE_BYTES = 8 << 20   # parallel host copies move pieces of this size


def copy_runs(dst_rows, arena, offsets: list[int], indices: list[int], row_bytes: int,
              to_arena: bool, pool=None) -> None:
    """Copy rows between a [n, row_bytes] buffer and arena slots, one copy per adjacent run.

    With a thread pool, host-to-host runs are cut into 8 MiB pieces copied in parallel
    (numpy's copy releases the GIL): block-sized memcpys stay below glibc's large-copy path
    and one thread measured ~6 GB/s here, two threads together ~8.5 GB/s."""
    pieces = []
    for first, count, start in runs(offsets, indices, row_bytes):
        rows = dst_rows[first:first + count].reshape(-1)
        slots = arena[start:start + count * row_bytes]
        dst, src = (slots, rows) if to_arena else (rows, slots)
        if pool is None or _as_numpy(dst) is None or _as_numpy(src) is None:
            copy_rows(dst, src)
            continue
        for a in range(0, count * row_bytes, _PIECE_BYTES):
            pieces.append((dst[a:a + _PIECE_BYTES], src[a:a + _PIECE_BYTES]))
    if len(pieces) == 1:
        copy_rows(*pieces[0])
    elif pieces:
        for fut in [pool.submit(copy_rows, d, s) for d, s in pieces]:
            fut.result()
