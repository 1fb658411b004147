"""The replay's hosts: real `kvstore serve` processes on this machine, each with its own
socket, arena (/dev/shm) and SSD directory, sized in blocks of the trace's layout.

    fleet = Fleet.start(n, HostSize(dram_blocks, ssd_blocks, block_bytes), workdir,
                        remote_url=None, events=False)
    fleet.hosts[i].ns        # the host's Namespace (its own KVClient)
    fleet.close()            # clients closed, daemons stopped, their directories removed

Capacities are exact: the DRAM arena holds ``dram_blocks`` slots (its chunks a whole number of
slots), the SSD tier whole segments of ``ssd_slots_per_segment`` slots (``ssd_blocks`` rounded
up to whole segments: ``HostSize.ssd_capacity_blocks``).
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvstore.bench.cluster_engines import free_port
from kvstore.core.arena import HEADER_BYTES as ARENA_HEADER_BYTES
from kvstore.core.layout import KVLayout
from kvstore.testing.daemon import DaemonProcess, temp_shm_dir
from kvstore.tiers.ssd.format import HEADER_BYTES as SSD_HEADER_BYTES
from kvstore.v1 import kvstore_pb2 as pb

_MAX_CHUNK_SLOTS = 256      # DRAM slots per arena chunk at most (fewer chunks, faster growth)
_SSD_SEGMENTS = 32          # about this many SSD slab files per host


@dataclass(frozen=True)
class HostSize:
    dram_blocks: int
    ssd_blocks: int          # 0: no SSD tier
    layout: KVLayout

    @property
    def slot_bytes(self) -> int:
        return self.layout.slot_bytes

    def chunk_slots(self) -> int:
        """The largest divisor of dram_blocks up to _MAX_CHUNK_SLOTS and at most half of it
        (the daemon wants two chunks at least), so the arena is exactly dram_blocks slots."""
        top = max(1, min(_MAX_CHUNK_SLOTS, self.dram_blocks // 2))
        return next(d for d in range(top, 0, -1) if self.dram_blocks % d == 0)

    @property
    def ssd_slots_per_segment(self) -> int:
        return max(1, -(-self.ssd_blocks // _SSD_SEGMENTS))

    @property
    def ssd_segments(self) -> int:
        return -(-self.ssd_blocks // self.ssd_slots_per_segment) if self.ssd_blocks else 0

    @property
    def ssd_capacity_blocks(self) -> int:
        return self.ssd_segments * self.ssd_slots_per_segment

    @property
    def ssd_segment_bytes(self) -> int:
        # a slab file: its header, then per slot a 4 KiB slot header and the payload
        return SSD_HEADER_BYTES + self.ssd_slots_per_segment * (SSD_HEADER_BYTES + self.slot_bytes)

    @property
    def ssd_bytes(self) -> int:
        return self.ssd_segments * self.ssd_segment_bytes

    def daemon_args(self, ssd_dir: Path) -> list[str]:
        args = ["--dram-bytes", str(ARENA_HEADER_BYTES + self.dram_blocks * self.slot_bytes),
                "--chunk-bytes", str(self.chunk_slots() * self.slot_bytes),
                "--max-inflight-bytes-per-client", str(max(64 << 20,
                                                          self.dram_blocks * self.slot_bytes))]
        if self.ssd_blocks:
            args += ["--ssd-dir", str(ssd_dir), "--ssd-bytes", str(self.ssd_bytes),
                     "--ssd-segment-bytes", str(self.ssd_segment_bytes),
                     "--ssd-io-threads", "2"]
        return args


@dataclass
class Host:
    index: int
    daemon: DaemonProcess
    client: object = None        # kvstore.client.KVClient
    ns: object = None            # its Namespace of the trace's layout
    events_endpoint: str = ""    # tcp://127.0.0.1:PORT when the daemon publishes KV events
    replay_endpoint: str = ""    # and its replay/snapshot socket


@dataclass
class Fleet:
    hosts: list[Host] = field(default_factory=list)

    @classmethod
    def start(cls, n: int, size: HostSize, workdir: Path, model_id: str,
              remote_url: str | None = None, remote_args: tuple[str, ...] = (),
              events: bool = False, startup_timeout_s: float = 120.0) -> "Fleet":
        """Start n daemons (closing those already started if one fails) and connect to each."""
        from kvstore.client import KVClient
        fleet = cls()
        try:
            for i in range(n):
                wd = Path(workdir) / f"host{i}"
                wd.mkdir(parents=True)
                shm = temp_shm_dir("kvstore-trace-", fallback=wd)
                args = size.daemon_args(wd / "ssd")
                endpoint = replay = ""
                if events:
                    endpoint = f"tcp://127.0.0.1:{free_port()}"
                    replay = f"tcp://127.0.0.1:{free_port()}"
                    args += ["--kv-events-endpoint", endpoint,
                             "--kv-events-replay-endpoint", replay]
                if remote_url:
                    args += ["--remote", remote_url, *remote_args]
                d = DaemonProcess(wd, shm, args, owned_dirs=(shm, wd))
                fleet.hosts.append(Host(i, d, events_endpoint=endpoint, replay_endpoint=replay))
                d.start(startup_timeout_s)
            for h in fleet.hosts:
                h.client = _connect(KVClient, h.daemon.socket)
                h.ns = h.client.namespace(model_id, size.layout)
                _wait_dram_ready(h.client, startup_timeout_s)
        except BaseException:
            fleet.close()
            raise
        return fleet

    def close(self) -> None:
        for h in self.hosts:
            if h.client is not None:
                try:
                    h.client.close()
                except Exception:      # a client of a dead daemon: the daemon goes anyway
                    pass
            h.daemon.close()
            shutil.rmtree(h.daemon.workdir, ignore_errors=True)


def _connect(client_cls, socket: str, attempts: int = 3):
    """A client of a daemon that already answers: on a loaded machine (the replay's hosts
    share its cores) a first connection can time out; try again before giving up."""
    from kvstore.client.errors import Unavailable
    for attempt in range(attempts):
        try:
            return client_cls(socket, timeout_s=60.0)
        except Unavailable:
            if attempt == attempts - 1:
                raise
            time.sleep(1.0)


def _wait_dram_ready(client, timeout_s: float) -> None:
    """The arena is prepared in the background after start-up: wait for all of it, so the
    replay meets the configured capacity from its first request."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(t.ready_bytes >= t.capacity_bytes for t in client.stats().tiers
               if t.tier == pb.TIER_DRAM):
            return
        time.sleep(0.05)
    raise RuntimeError(f"the DRAM arena was not ready in {timeout_s:g}s")
