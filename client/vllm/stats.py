"""The vLLM connector's counters: cumulative totals, and the per-interval stats vLLM logs."""
from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

_COUNTERS = ("lookups", "hit_blocks", "miss_blocks", "hit_tokens", "sync_loads", "async_loads",
             "loaded_blocks", "loaded_bytes", "load_failed_blocks", "sync_reread_blocks",
             "stored_blocks", "stored_bytes", "store_failed_blocks", "store_skipped_blocks",
             # blocks copied out of the pages and sent that the store held already
             "store_present_blocks",
             "fallbacks",
             # slow-tier hits the planner was asked about, blocks found but left to vLLM to
             # compute (faster than reading them), and plans that failed (the hit loaded whole)
             "plans", "planned_recompute_blocks", "plan_failures",
             # synchronous loads scattered layer by layer while the forward ran, and those
             # whose forward read a layer without waiting for it (then reloaded whole)
             "layerwise_loads", "layer_wait_misses", "streamed_loads", "streamed_blocks",
             # kv_producer: blocks of finished requests readable from the cluster tier when
             # the request was reported finished, and requests reported before all were
             "remote_placed_blocks", "remote_flush_timeouts",
             # microseconds the connector held the engine's thread, by hook: the scheduler's
             # lookups (get_num_new_matched_tokens), the loads before the forward
             # (start_load_kv), the stores after it (wait_for_save), and the step's end
             # (get_finished: proofs, read reports, asynchronous loads' scatter)
             "lookup_us", "load_us", "save_us", "finish_us")


@dataclass
class KVStoreConnectorStats(KVConnectorStats):
    """Counters over one logging interval; aggregate() sums workers and the scheduler."""

    def __post_init__(self):
        for k in _COUNTERS:
            self.data.setdefault(k, 0)

    def reset(self):
        self.data = {k: 0 for k in _COUNTERS}

    def aggregate(self, other: KVConnectorStats) -> "KVStoreConnectorStats":
        for k, v in other.data.items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


def engine_time(counter: str):
    """Decorate a connector hook: add the microseconds each call took to ``counter``."""
    def wrap(fn):
        @functools.wraps(fn)
        def timed(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(self, *args, **kwargs)
            finally:
                self.counters.add(**{counter: int((time.perf_counter() - t0) * 1e6)})
        return timed
    return wrap


class Counters:
    """Cumulative counters plus the interval ones vLLM's stats logger takes."""

    def __init__(self):
        self.total = dict.fromkeys(_COUNTERS, 0)
        self._interval = dict.fromkeys(_COUNTERS, 0)
        self._lock = threading.Lock()

    def add(self, **kv: int) -> None:
        with self._lock:
            for k, v in kv.items():
                self.total[k] += v
                self._interval[k] += v

    def take(self) -> KVStoreConnectorStats | None:
        with self._lock:
            if not any(self._interval.values()):
                return None
            out, self._interval = self._interval, dict.fromkeys(_COUNTERS, 0)
        return KVStoreConnectorStats(data=out)
