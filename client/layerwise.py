"""Layer-wise loads: one engine step's blocks scattered into its paged KV cache layer by layer
on a loader thread, while the forward runs the layers already there.

Contract, in vLLM's call order within one step (all calls but ``run`` on the engine thread):

  start   ``LayerLoad(pages, kv, segments)`` then ``Loader.submit(job)``: the loader thread
          scatters layer 0 of every segment, then layer 1, ... (``PageFormat.scatter_layer``).
  wait    ``job.wait(l)`` (from ``wait_for_layer_load``): returns once layer ``l`` is in the
          pages, or the job failed (then every block of the job is a load error: see finish).
          A layer the loader has not started yet is scattered by the waiting thread itself:
          the forward never waits for the loader to be scheduled (it gets the interpreter
          lock only rarely beside a busy engine thread), only for a copy already under way.
  finish  ``job.finish()`` (end of the forward, before any proof is checked or any page is
          handed back to vLLM): no copy of this job runs after it returns (it moves what
          nobody has claimed, then waits for the copies under way), so vLLM may reuse the
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
    blocks: arena rows or a leased get's output[, ready]), scattered layer-major; ``ready(l)``,
    where given, returns once layer l of that segment's blocks has arrived (a layer-wise get). Layers are claimed in
    order, by the loader thread or by a thread waiting for the next unclaimed one."""

    def __init__(self, pages: PageFormat, kv: list[torch.Tensor],
                 segments: list[tuple]):
        self._pages = pages
        self._kv = kv
        self._segments = segments
        self._cond = threading.Condition()
        self._claimed = 0            # layers [0, _claimed) were taken by a thread to scatter
        self._done = [False] * len(kv)
        self._inflight = 0           # claimed layers whose scatter has not returned
        self.error: BaseException | None = None
        self._waited = [False] * len(kv)
        self.stolen = 0              # layers the waiting thread scattered itself

    @property
    def num_blocks(self) -> int:
        return sum(len(seg[0]) for seg in self._segments)

    def _claim(self) -> int | None:
        """(under the lock) The next layer to scatter, now this thread's; None: none left or
        the job failed."""
        if self.error is not None or self._claimed >= len(self._kv):
            return None
        self._claimed += 1
        self._inflight += 1
        return self._claimed - 1

    def _scatter(self, l: int) -> None:
        """Scatter layer ``l`` of every segment (its claimer only), then say so. A segment
        whose bytes are still arriving (a third item, ``ready``) is waited for first:
        ``ready(l)`` returns once its layer ``l`` is in place (kvstore LayerLease.wait_layer)."""
        failed = None
        try:
            for ids, blocks, *ready in self._segments:
                if ready and ready[0] is not None:
                    ready[0](l)
                self._pages.scatter_layer(self._kv[l], ids, blocks, l)
        except BaseException as exc:  # noqa: BLE001 - reported by finish(), never raised here
            failed = exc
        with self._cond:
            if failed is None:
                self._done[l] = True
            else:
                self.error = self.error or failed
            self._inflight -= 1
            self._cond.notify_all()

    def run(self) -> None:
        """Scatter every layer nobody else has claimed, in order (the loader thread; finish)."""
        while True:
            with self._cond:
                l = self._claim()
            if l is None:
                return
            self._scatter(l)

    def wait(self, layer: int) -> None:
        """Until layer ``layer`` is in the pages, or the job failed (finish says so). When the
        loader has not claimed it yet, this thread claims and scatters it now."""
        self._waited[layer] = True
        with self._cond:
            mine = self._claim() if self._claimed == layer else None
            if mine is None:
                self._cond.wait_for(lambda: self._done[layer] or self.error is not None)
                return
        self.stolen += 1
        self._scatter(mine)

    def finish(self) -> bool:
        """Scatter the layers nobody has claimed yet (a forward that skipped a wait), then wait
        for the copies under way: after it no copy of this job runs (a loader that reaches the
        job later finds nothing to claim). True when every layer was scattered and waited for
        before the forward read it (see the module docstring)."""
        self.run()                   # what nobody has claimed yet, this thread moves now
        with self._cond:
            self._cond.wait_for(lambda: self._inflight == 0)
        return self.error is None and all(self._waited)   # no error: every layer is done

    @property
    def unwaited_layers(self) -> int:
        return self._waited.count(False)

    def run_inline(self) -> None:
        """Scatter every segment, all layers at once, on the calling thread now (the
        whole-load mode: PageFormat.scatter, Triton on CUDA): the forward then needs no
        per-layer wait. On CPU no second thread helps: a loader thread copying layers beside
        this one halved the scatter alone, but the forward that followed ran slower in the
        engine (docs/integrations/vllm.md, "Load modes")."""
        try:
            for ids, blocks, *ready in self._segments:
                if ready and ready[0] is not None:
                    ready[0](len(self._kv) - 1)      # every layer of it in place
                self._pages.scatter(self._kv, ids, blocks)
            self._done = [True] * len(self._kv)
        except BaseException as exc:  # noqa: BLE001 - reported by finish()
            self.error = exc
        self._claimed = len(self._kv)
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
