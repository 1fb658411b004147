"""A SGLang HiCache L3 storage backend backed by the kvstore daemon (sglang >= 0.5.23).

Switch it on with::

    python -m sglang.launch_server --model-path MODEL --page-size 64 \\
        --enable-hierarchical-cache --hicache-storage-backend dynamic \\
        --hicache-storage-backend-extra-config '{"backend_name":"kvstore",
            "module_path":"kvstore.client.sglang","class_name":"KVStoreHiCacheStorage",
            "interface_v1":1,"socket":"/run/kvstore/kv.sock"}'

``interface_v1`` makes SGLang's controller call the zero-copy paths: ``batch_set_v1`` (backup)
copies each page straight from the host pool into the arena slots the daemon allocated, and
``batch_get_v1`` (prefetch) copies leased arena slots straight into the host pool pages; there
is no intermediate buffer (same host: the mapped arena; over TCP the SDK streams bytes instead).
Host pool layouts ``layer_first``, ``page_first`` and ``page_first_direct`` are supported; any
other layout, and MLA models, are refused at ``register_mem_pool_host`` with a message naming
them. A stored page is the host pool's page in that layout's own element order (the order of
SGLang's ``get_data_page``), so the v1 and the older ``get``/``set`` calls read each other's
pages, and the layout is part of the namespace: engines with different layouts never mix bytes.

Keys: SGLang's page keys (a SHA-256 chain over the prompt, 64 hex chars) are mapped to kvstore's
16-byte keys by hashing them with the namespace id, which already folds in the model, the
KV geometry, the tp rank/size, the pp rank/size and the host layout; a batch keeps SGLang's
prefix order, so ``batch_exists`` answers the longest cached prefix with one Lookup, and a put
passes the key of the page before it (``extra_info.prefix_keys``) as the parent for
prefix-aware eviction.

Failure rule (as the other adapters): a daemon that is down, slow or restarted gives misses and
``False`` entries, never an exception into SGLang's threads; the link reconnects on its own
after a backoff (client/link.py) and every fallback is reported to the daemon.

extra_config keys (besides SGLang's own backend_name/module_path/class_name/interface_v1):
kvstore.client.adapter_config.SGLANG_FIELDS, listed in docs/configuration.md.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Any, List, Optional

import torch
from sglang.srt.mem_cache.hicache_storage import (HiCacheStorage, HiCacheStorageConfig,
                                                  HiCacheStorageExtraInfo)

from kvstore.client.adapter_config import SGLANG_FIELDS, SGLANG_OWN_KEYS, parse_extra_config
from kvstore.client.errors import InvalidArgument, KVStoreError, ResourceExhausted, StaleRead
from kvstore.client.link import DaemonLink
from kvstore.core.keys import KEY_BYTES, namespace_digest
from kvstore.core.layout import KVLayout

log = logging.getLogger("sglang.kvstore_hicache")

SUPPORTED_LAYOUTS = ("layer_first", "page_first", "page_first_direct")

class _PagePool:
    """Views of one SGLang host pool's pages: ``page(i)`` is the page starting at token index
    ``i`` as a tensor view of the pool (no copy), in the element order SGLang's
    ``get_data_page`` uses for that layout."""

    def __init__(self, pool):
        self.layout = pool.layout
        self.page_size = pool.page_size
        self.dtype = pool.dtype
        self.buf = pool.kv_buffer
        L, P, H, D = pool.layer_num, pool.page_size, pool.head_num, pool.head_dim
        self.shape = {"layer_first": (2, L, P, H, D), "page_first": (2, P, L, H, D),
                      "page_first_direct": (2, L, P, H, D)}[self.layout]

    def page(self, index: int) -> torch.Tensor:
        if self.layout == "layer_first":
            return self.buf[:, :, index:index + self.page_size]
        if self.layout == "page_first":
            return self.buf[:, index:index + self.page_size]
        return self.buf[:, index // self.page_size]

    def as_page(self, row: torch.Tensor) -> torch.Tensor:
        """An arena byte row (or any tensor of a page's elements) viewed as a page."""
        if row.dtype == torch.uint8:
            row = row.view(self.dtype)
        return row.view(self.shape)


class KVStoreHiCacheStorage(HiCacheStorage):
    """SGLang's dynamic-backend contract: ``cls(storage_config, kwargs)``; then
    ``register_mem_pool_host`` once before any I/O. Thread-safe (SGLang calls it from its
    prefetch and backup threads at once)."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Optional[dict] = None):
        # The keys, their types and defaults: kvstore.client.adapter_config.SGLANG_FIELDS.
        self.cfg = parse_extra_config(SGLANG_FIELDS, storage_config.extra_config,
                                      "kvstore HiCache backend extra_config", SGLANG_OWN_KEYS)
        self.storage_config = storage_config
        self.pages: _PagePool | None = None
        self.kv_layout: KVLayout | None = None
        self.model_id = ""
        self._link: DaemonLink | None = None
        self._seed = b""
        self._lock = threading.Lock()
        self._unreported = [0, 0]        # fallbacks (events, pages) not yet told the daemon
        self._counters = dict(lookups=0, lookup_hit_pages=0, lookup_miss_pages=0,
                              set_pages=0, set_failed_pages=0, get_pages=0,
                              get_failed_pages=0, fallbacks=0)
        # Drained by get_stats (SGLang's StorageMetrics: pages and bandwidth per call).
        self._metrics = dict(prefetch_pgs=[], backup_pgs=[], prefetch_bandwidth=[],
                             backup_bandwidth=[])

    # -- registration --------------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host) -> None:
        """Check the host pool's format and derive the namespace; raises ValueError naming
        what is unsupported (SGLang then fails the attach instead of serving wrong bytes)."""
        cfg = self.storage_config
        if cfg.is_mla_model:
            raise ValueError("kvstore HiCache backend: MLA models (rank-replicated KV) are not "
                             "supported yet; use a MHA/GQA model or another backend")
        layout = getattr(mem_pool_host, "layout", None)
        if layout not in SUPPORTED_LAYOUTS:
            raise ValueError(f"kvstore HiCache backend: host pool layout {layout!r} is not "
                             f"supported; use --hicache-mem-layout one of {list(SUPPORTED_LAYOUTS)}")
        if getattr(mem_pool_host, "v_head_dim", mem_pool_host.head_dim) != mem_pool_host.head_dim:
            raise ValueError("kvstore HiCache backend: K and V head dims differ "
                             f"({mem_pool_host.head_dim} vs {mem_pool_host.v_head_dim}); "
                             "not supported")
        super().register_mem_pool_host(mem_pool_host)
        self.pages = _PagePool(mem_pool_host)
        self.kv_layout = KVLayout(num_layers=mem_pool_host.layer_num,
                                  num_kv_heads=mem_pool_host.head_num,
                                  head_dim=mem_pool_host.head_dim,
                                  block_tokens=mem_pool_host.page_size,
                                  dtype=str(mem_pool_host.dtype),
                                  tp_rank=cfg.tp_rank, tp_size=cfg.tp_size)
        base = self.cfg["model_id"] or cfg.model_name or "sglang-model"
        # tp is in the KVLayout; pp and the host layout go into the model id.
        self.model_id = f"{base}|sglang:{layout}|pp{cfg.pp_rank}/{cfg.pp_size}"
        name = f"sglang-tp{cfg.tp_rank}-pp{cfg.pp_rank}"
        self._link = DaemonLink(self.cfg, self.model_id, self.kv_layout, name, log,
                                "kvstore HiCache backend")
        self._seed = namespace_digest(self.model_id, self.kv_layout, self.cfg["tenant"])

    # -- keys ----------------------------------------------------------------------------------
    def keys_for(self, keys: List[str]) -> list[bytes]:
        """kvstore keys of SGLang page keys: identical in every process (no hash())."""
        out = []
        for k in keys:
            h = hashlib.blake2b(self._seed, digest_size=KEY_BYTES, person=b"kvstore-sglang")
            h.update(k.encode())
            out.append(h.digest())
        return out

    def _parent(self, extra_info: Optional[HiCacheStorageExtraInfo]) -> bytes | None:
        prefix = extra_info.prefix_keys if extra_info is not None else None
        return self.keys_for(prefix[-1:])[0] if prefix else None

    # -- the v1 (zero-copy) calls ----------------------------------------------------------------
    def batch_exists(self, keys: List[str],
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> int:
        if not keys:
            return 0
        ns = self._namespace()
        hit = 0
        if ns is None:
            self._skipped(len(keys))
        else:
            try:
                hit = ns.lookup(self.keys_for(keys)).num_cached
            except Exception as exc:  # noqa: BLE001 - a miss, never an exception into SGLang
                self._failed(exc, "lookup", len(keys))
        self._count(lookups=1, lookup_hit_pages=hit, lookup_miss_pages=len(keys) - hit)
        return hit

    def batch_set_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        p = self._page_indices(keys, host_indices)
        if p is None:
            return [False] * len(keys)
        return self._write(keys, [self.pages.page(i) for i in p], extra_info)

    def batch_get_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        p = self._page_indices(keys, host_indices)
        if p is None:
            return [False] * len(keys)
        return self._read(keys, [self.pages.page(i) for i in p])

    # -- the older calls (flat page tensors, SGLang's generic path) -----------------------------
    def get(self, key: str, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> torch.Tensor | None:
        return self.batch_get([key], [target_location] if target_location is not None
                              else None)[0]

    def batch_get(self, keys: List[str], target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> List[torch.Tensor | None]:
        if self.pages is None:
            return [None] * len(keys)
        dst = list(target_locations) if target_locations is not None else [
            torch.empty(self.pages.shape, dtype=self.pages.dtype).flatten() for _ in keys]
        ok = self._read(keys, dst)
        return [d if good else None for d, good in zip(dst, ok)]

    def set(self, key: str, value: Optional[Any] = None, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: List[str], values: Optional[Any] = None,
                  target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> bool:
        if self.pages is None or values is None or len(values) != len(keys):
            return False
        return all(self._write(keys, list(values), None))

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    # -- statistics and lifecycle ----------------------------------------------------------------
    def get_stats(self):
        """SGLang's StorageMetrics since the last call (pages and GB/s per backup/prefetch
        call); kvstore's own counters are in :meth:`counters`."""
        from sglang.srt.observability.metrics_collector import StorageMetrics
        m = StorageMetrics()
        with self._lock:
            for name, values in self._metrics.items():
                getattr(m, name).extend(values)
                values.clear()
        return m

    def counters(self, daemon: bool = False) -> dict:
        """This backend's cumulative counters; ``daemon=True`` adds the daemon's statistics of
        this namespace under "daemon" (empty when it is unreachable)."""
        with self._lock:
            out = dict(self._counters)
        if daemon:
            out["daemon"] = {}
            ns = self._namespace()
            if ns is not None:
                try:
                    st = ns.client.stats()
                    out["daemon"] = {"recompute_fallbacks": st.recompute_fallbacks,
                                     "lookups": st.lookups}
                    for n in st.namespaces:
                        if n.namespace_id == ns.namespace_id:
                            out["daemon"]["namespace"] = {
                                k: v for k, v in vars(n).items()
                                if isinstance(v, (int, float))}
                except Exception as exc:  # noqa: BLE001
                    self._failed(exc, "stats", 0)
        return out

    def clear(self) -> None:
        """Nothing to drop here: stored pages belong to the daemon (shared by every engine),
        and evicting them is its decision."""

    def close(self) -> None:
        if self._link is not None:
            self._link.close()

    # -- internals -------------------------------------------------------------------------------
    def _namespace(self):
        ns = self._link.namespace() if self._link is not None else None
        if ns is not None and self._unreported[0]:
            with self._lock:
                count, pages = self._unreported
                self._unreported = [0, 0]
            # fallbacks while the daemon was unreachable, reported once it is back
            ns.client.report_fallbacks(count, pages, "unavailable", ns.namespace_id)
        return ns

    def _page_indices(self, keys, host_indices) -> list[int] | None:
        if self.pages is None:
            log.warning("kvstore HiCache backend: I/O before register_mem_pool_host")
            return None
        P = self.pages.page_size
        if len(host_indices) != len(keys) * P:
            log.warning("kvstore HiCache backend: %d host indices for %d pages of %d tokens",
                        len(host_indices), len(keys), P)
            return None
        return [int(i) for i in host_indices[::P].tolist()]

    def _write(self, keys: List[str], pages: list, extra_info) -> List[bool]:
        n = len(keys)
        ns = self._namespace()
        if ns is None or not n:
            self._skipped(n)
            self._count(set_failed_pages=n)
            return [False] * n
        t0 = time.perf_counter()
        kk = self.keys_for(keys)
        parent = self._parent(extra_info)
        step = ns.client.max_batch_blocks
        try:
            for s in range(0, n, step):
                self._write_batch(ns, kk[s:s + step], pages[s:s + step],
                                  parent if s == 0 else kk[s - 1])
        except Exception as exc:  # noqa: BLE001
            self._failed(exc, "store", n)
            self._count(set_failed_pages=n)
            return [False] * n
        dt = time.perf_counter() - t0
        self._count(set_pages=n)
        self._metric("backup", n, dt)
        return [True] * n

    def _write_batch(self, ns, kk: list[bytes], pages: list, parent: bytes | None) -> None:
        if not ns.client.shared_memory:        # TCP: the SDK streams the bytes
            rows = torch.stack([p.reshape(self.kv_layout.block_shape) for p in pages])
            ns.put(kk, rows, parent_key=parent).result(timeout=ns.client.timeout_s)
            return
        alloc = ns.allocate(kk, parent)
        try:
            for dst, src in zip(alloc.views(), pages):
                if dst is not None:        # None: the daemon holds this page already
                    self.pages.as_page(dst).copy_(src.view(self.pages.shape))
        except BaseException:
            alloc.abort()
            raise
        alloc.commit()

    def _read(self, keys: List[str], dst: list) -> List[bool]:
        n = len(keys)
        ns = self._namespace()
        if ns is None or not n:
            self._skipped(n)
            self._count(get_failed_pages=n)
            return [False] * n
        t0 = time.perf_counter()
        kk = self.keys_for(keys)
        found = 0
        try:
            step = ns.client.max_batch_blocks
            for s in range(0, n, step):
                got = self._read_batch(ns, kk[s:s + step], dst[s:s + step])
                found += got
                if got < len(kk[s:s + step]):
                    break
        except Exception as exc:  # noqa: BLE001
            self._failed(exc, "load", n)
            found = 0
        self._count(get_pages=found, get_failed_pages=n - found)
        if found:
            self._metric("prefetch", found, time.perf_counter() - t0)
        return [True] * found + [False] * (n - found)

    def _read_batch(self, ns, kk: list[bytes], dst: list) -> int:
        if not ns.client.shared_memory:
            rows = ns.get(kk).result(timeout=ns.client.timeout_s)
            for d, r in zip(dst, rows):
                d.view(self.pages.shape).copy_(r.view(self.pages.shape))
            return len(rows)
        lease = ns.acquire(kk)
        try:
            for d, src in zip(dst, lease.views()):
                d.view(self.pages.shape).copy_(self.pages.as_page(src))
        except BaseException:
            try:
                lease.release()
            except KVStoreError:
                pass
            raise
        # StaleRead (the lease expired mid-copy): the copied bytes are discarded by the caller
        # (every entry False), never served.
        lease.release()
        return len(lease)

    def _failed(self, exc: BaseException, what: str, pages: int) -> None:
        """One fallback: counted, reported to the daemon; a connection-level error drops the
        link (it reconnects after a backoff). A refused put (arena full) or a stale lease
        keeps the link."""
        keep = isinstance(exc, (ResourceExhausted, StaleRead, InvalidArgument))
        log.warning("kvstore HiCache backend: %s of %d pages failed (%s: %s); SGLang recomputes",
                    what, pages, type(exc).__name__, exc)
        with self._lock:
            self._counters["fallbacks"] += 1
            self._unreported[0] += 1
            self._unreported[1] += pages
        if not keep and self._link is not None:
            self._link.failed(exc)      # reported by _namespace once the daemon is back

    def _skipped(self, pages: int) -> None:
        """The link is backing off (daemon down): a fallback without a new attempt."""
        if pages:
            with self._lock:
                self._counters["fallbacks"] += 1
                self._unreported[0] += 1
                self._unreported[1] += pages

    def _count(self, **deltas) -> None:
        with self._lock:
            for k, v in deltas.items():
                self._counters[k] += v

    def _metric(self, kind: str, pages: int, seconds: float) -> None:
        gbps = pages * self.kv_layout.block_bytes / max(seconds, 1e-9) / 1e9
        with self._lock:
            self._metrics[f"{kind}_pgs"].append(pages)
            self._metrics[f"{kind}_bandwidth"].append(gbps)
