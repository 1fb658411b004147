"""The SSD tier's measured read bandwidth, for the recompute planner (PlanRecompute) and the
vLLM connector's prefix-load decision: how fast recent promotions actually read, not the
disk's datasheet figure."""
from __future__ import annotations

# A batch of this many bytes replaces the estimate outright; smaller ones move it in
# proportion (a 1-block read is latency-bound and says little about throughput).
FULL_WEIGHT_BYTES = 64 << 20


class ReadBandwidth:
    def __init__(self):
        self._bps = 0.0

    def observe(self, nbytes: int, seconds: float) -> None:
        """One batch of reads moved ``nbytes`` in ``seconds`` of wall time."""
        if nbytes <= 0 or seconds <= 0:
            return
        bw = nbytes / seconds
        w = min(1.0, nbytes / FULL_WEIGHT_BYTES)
        self._bps = bw if not self._bps else (1 - w) * self._bps + w * bw

    def bps(self, limit_bps: float = 0.0) -> float:
        """The estimate (bytes/s), capped by ``limit_bps`` when set; 0 before any read."""
        bw = self._bps
        return min(bw, limit_bps) if bw and limit_bps else (bw or 0.0)
