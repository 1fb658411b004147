"""Layer-wise loads: one engine step's blocks scattered into its paged KV cache layer by layer
on a loader thread, while the forward runs the layers already there.

Contract, in vLLM's call order within one step (all calls but ``run`` on the engine thread):

  start   ``LayerLoad(pages, kv, segments)`` then ``Loader.submit(job)``: the loader thread
          scatters layer 0 of every segment, then layer 1, ... (``PageFormat.scatter_layer``).
  wait    ``job.wait(l)`` (from ``wait_for_layer_load``): returns once layer ``l`` is in the
          pages, or the job failed (then every block of the job is a load error: see finish).
  finish  ``job.finish()`` (end of the forward, before any proof is checked or any page is
          handed back to vLLM): waits for the loader to be done with every page and every
          source view — no copy of this job runs after it returns, so vLLM may reuse the
          pages and the arena proof (ArenaRead.verify) covers every read. Returns whether
          every layer was scattered AND the forward waited for each before reading it; when
          not, the caller reports every block of the job as a load error (vLLM discards the
          step's output for those requests and recomputes them).

The loader's copies are torch ``copy_`` calls, which release the GIL for their whole length, so
the engine thread keeps running Python (the forward's layers) while a layer's bytes move.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable

import torch

from kvstore.kernels.pages import PageFormat


class LayerLoad:
    """One step's synchronous loads: ``segments`` are (vLLM block ids, [n, layers, 2, N, H, D]
    blocks: arena rows or a leased get's output), scattered layer-major."""

    def __init__(self, pages: PageFormat, kv: list[torch.Tensor],
                 segments: list[tuple[list[int], torch.Tensor]]):
        self._pages = pages
        self._kv = kv
        self._segments = segments
        self._cond = threading.Condition()
        self._scattered = 0          # layers [0, _scattered) are in the pages
        self._ended = False          # the loader is done with this job (all layers, or failed)
        self.error: BaseException | None = None
        self._waited = [False] * len(kv)

    @property
    def num_blocks(self) -> int:
        return sum(len(ids) for ids, _ in self._segments)

    def run(self) -> None:
        """(loader thread) Scatter every segment, layer by layer."""
        try:
            for l, layer in enumerate(self._kv):
                for ids, blocks in self._segments:
                    self._pages.scatter_layer(layer, ids, blocks, l)
                with self._cond:
                    self._scattered = l + 1
                    self._cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - reported by finish(), never raised here
            self.error = exc
        finally:
            with self._cond:
                self._ended = True
                self._cond.notify_all()

    def wait(self, layer: int) -> None:
        """Until layer ``layer`` is in the pages, or the job ended (failed: finish says so)."""
        self._waited[layer] = True
        with self._cond:
            self._cond.wait_for(lambda: self._scattered > layer or self._ended)

    def finish(self) -> bool:
        """Wait for the loader to be done with this job; True when every layer was scattered
        and waited for before the forward read it (see the module docstring)."""
        with self._cond:
            self._cond.wait_for(lambda: self._ended)
        return self.error is None and all(self._waited)

    @property
    def unwaited_layers(self) -> int:
        return self._waited.count(False)

    def run_inline(self) -> None:
        """Scatter every segment, all layers at once, on the calling thread now (the
        whole-load mode: PageFormat.scatter, Triton on CUDA): the forward then needs no
        per-layer wait."""
        try:
            for ids, blocks in self._segments:
                self._pages.scatter(self._kv, ids, blocks)
            self._scattered = len(self._kv)
        except BaseException as exc:  # noqa: BLE001 - reported by finish()
            self.error = exc
        self._ended = True
        self._waited = [True] * len(self._waited)


class Loader:
    """The loader thread (one per worker connector; started on first use): runs submitted
    jobs in order. Copies only: a job always ends, so finish() needs no timeout."""

    def __init__(self, name: str = "kvstore-layer-load"):
        self._name = name
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, job: LayerLoad) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()
        self._jobs.put(job.run)

    def _loop(self) -> None:
        while True:
            fn = self._jobs.get()
            if fn is None:
                return
            fn()

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
