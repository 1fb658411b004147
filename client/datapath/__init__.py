"""How block bytes move between a caller's tensors and the daemon: one data path per medium.

A KVClient picks its path once per session, from what the daemon granted in the session's
first event (``open_datapath``), and its Namespaces speak only to the :class:`DataPath`
interface (base.py):

  StreamPath   (stream.py)  gRPC: WriteBlocks / ReadBlocks. No arena granted (TCP, another
                            host), or the mapping failed.
  ArenaPath    (arena.py)   the shared DRAM arena, mapped: host memcpy into and out of slots.
  PinnedPath   (pinned.py)  the arena registered as pinned memory (client/cuda.py): CUDA
                            tensors move by DMA, host ones by memcpy as on ArenaPath.
  HBMPath      (hbm.py)     the daemon's HBM pool opened (client/hbm.py) on top of an arena
                            path: gets into tensors on the pool's GPU read device to device.
"""
from kvstore.client.datapath.base import DataPath, Read
from kvstore.client.datapath.open import open_datapath

__all__ = ["DataPath", "Read", "open_datapath"]
