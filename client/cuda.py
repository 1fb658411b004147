"""The SDK's CUDA data path: the mapped arena registered as pinned memory, and a copy stream.

On a CUDA host a client registers the daemon's shared arena with ``cudaHostRegister`` (through
``torch.cuda.cudart()``, in chunks on a thread of its own: kvstore.core.pinning), so a put of a GPU tensor is one D2H DMA per run of adjacent slots
straight into the arena, and a get into a GPU tensor one H2D DMA per run, on a side stream that
overlaps the caller's compute. No staging copy, no copy through the daemon.

Ordering contract:
* put: the copies wait for the work queued on the caller's current stream when put() was called
  (an event recorded then), so a tensor produced by the forward pass is complete before it is read;
* get(out=gpu_tensor): the copies also wait for the caller's stream at get() time; the future
  resolves once the bytes are in ``out`` (the I/O thread waits on the copy event, then releases the
  lease: a slot is never reused while a DMA still reads it).

Without CUDA (CPU-only torch, no torch, no device, or a failed registration) ``attach`` returns
None after one log line and the SDK keeps its CPU path unchanged.
"""
from __future__ import annotations

import logging
import sys

from kvstore.client.transfer import runs  # noqa: F401  (re-exported)
from kvstore.core.pinning import DEFAULT_CHUNK_BYTES, ChunkedRegistration

log = logging.getLogger("kvstore.client.cuda")

_HOST_REGISTER_PORTABLE = 1      # cudaHostRegisterPortable: pinned for every CUDA context


def is_cuda_tensor(x) -> bool:
    tensor = getattr(sys.modules.get("torch"), "Tensor", None)   # see transfer._is_torch
    return tensor is not None and isinstance(x, tensor) and x.device.type == "cuda"


def cuda_available() -> tuple[bool, str]:
    """(available, why not) without importing torch for a process that never did."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False, "torch is not imported in this process"
    if not torch.backends.cuda.is_built():
        return False, f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible"
    return True, ""


def attach(arena, arena_view, want: bool | None) -> "PinnedArena | None":
    """Pin ``arena`` for this process if asked (want=True) or if CUDA is in use (want=None)."""
    if want is False:
        return None
    ok, why = cuda_available()
    if not ok:
        # asked for: a warning; automatic on a CPU-only torch: one info line; no torch: quiet
        level = logging.WARNING if want else (
            logging.DEBUG if "not imported" in why else logging.INFO)
        log.log(level, "not pinning the kvstore arena: %s; GPU tensors (if any) are copied "
                "through pageable memory", why)
        return None
    try:
        return PinnedArena(arena, arena_view.torch)
    except RuntimeError as exc:
        log.warning("not pinning the kvstore arena: %s; GPU tensors are copied through "
                    "pageable memory", exc)
        return None


def ready_event(x):
    """An event on the current stream of ``x``'s device, or None for a non-CUDA tensor."""
    if not is_cuda_tensor(x):
        return None
    import torch
    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream(x.device))
    return ev


def copy_pieces(offsets: list[int], indices: list[int], row_bytes: int,
                split=None) -> list[tuple[int, int, int, int, int]]:
    """The copies for rows[i] <-> base[offsets[i]:+row] (i in indices): one per run of adjacent
    slots (rows [first, first + count) at base offset o), cut where ``split(o, nbytes)`` cuts it
    (kvstore.core.pinning.ChunkedRegistration.pieces: no copy spans two registrations). Each
    is (first, count, byte offset within the run's rows, base offset, length)."""
    out = []
    for first, count, o in runs(offsets, indices, row_bytes):
        for po, pn in (split(o, count * row_bytes) if split else [(o, count * row_bytes)]):
            out.append((first, count, po - o, po, pn))
    return out


def queue_copies(stream, base, rows, offsets: list[int], indices: list[int], ready,
                 to_base: bool, split=None):
    """Queue copies rows[i] <-> base[offsets[i]:+row] for i in indices on ``stream`` (one copy
    per run of adjacent slots, or per piece of it: see copy_pieces), after ``ready``; returns
    the event marking their end. ``base`` is a flat uint8 tensor: the arena (H2D/D2H; pinned,
    or a part of it still pageable: such a copy is staged by the driver, synchronously, and as
    correct) or the HBM pool (D2D)."""
    import torch
    bb = rows.shape[1]
    with torch.cuda.stream(stream):
        if ready is not None:
            stream.wait_event(ready)
        for first, count, r, o, n in copy_pieces(offsets, indices, bb, split):
            slots = base[o:o + n]
            dev = rows[first:first + count].view(-1)[r:r + n]
            if to_base:
                slots.copy_(dev, non_blocking=True)
            else:
                dev.copy_(slots, non_blocking=True)
        rows.record_stream(stream)           # the allocator must not reuse it early
        done = torch.cuda.Event()
        done.record(stream)
    return done


class PinnedArena:
    """The arena pinned in this process, with one copy stream per device. Pinning runs in
    chunks on a thread of its own (kvstore.core.pinning): connecting costs the caller (often
    the engine's thread) nothing, and copies of the part not pinned yet are staged by the
    driver until it is."""

    def __init__(self, arena, arena_tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        import torch
        self._torch = torch
        self.arena_tensor = arena_tensor            # flat uint8 CPU tensor over the mapping
        self.ptr = arena_tensor.data_ptr()
        self.size_bytes = arena.size_bytes
        rt = torch.cuda.cudart()
        self.registration = ChunkedRegistration(
            self.ptr, self.size_bytes,
            lambda ptr, n: rt.cudaHostRegister(ptr, n, _HOST_REGISTER_PORTABLE),
            rt.cudaHostUnregister, chunk_bytes, name="kvstore-pin-arena",
            what="the kvstore arena")
        self._streams: dict[int, object] = {}

    def _stream(self, device):
        idx = device.index if device.index is not None else self._torch.cuda.current_device()
        s = self._streams.get(idx)
        if s is None:
            s = self._streams[idx] = self._torch.cuda.Stream(device=idx)
        return s

    def _copy(self, gpu_rows, offsets: list[int], indices: list[int], ready, to_arena: bool):
        return queue_copies(self._stream(gpu_rows.device), self.arena_tensor, gpu_rows, offsets,
                            indices, ready, to_base=to_arena, split=self.registration.pieces)

    def to_arena(self, gpu_rows, offsets: list[int], indices: list[int], ready=None):
        """Queue D2H copies of gpu_rows[i] into the slots offsets[i]; returns the done event."""
        return self._copy(gpu_rows, offsets, indices, ready, to_arena=True)

    def from_arena(self, gpu_rows, offsets: list[int], ready=None, indices=None):
        """Queue H2D copies of the slots offsets[i] into gpu_rows[i] (every i, or those in
        ``indices``); returns the done event."""
        if indices is None:
            indices = list(range(len(offsets)))
        return self._copy(gpu_rows, offsets, indices, ready, to_arena=False)

    def close(self) -> None:
        """Unregister; call before the arena is unmapped. Waits for queued copies first."""
        if self.ptr is None:
            return
        for s in self._streams.values():
            s.synchronize()
        self.registration.close()
        self.ptr = None
