"""HFPrefixCache: ``generate`` of a transformers causal LM with cached prompt prefixes reused
(see the package docstring for the request path and the failure rule)."""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from kvstore.client.errors import FailedPrecondition, KVStoreError, Reason
from kvstore.client.link import Backoff, FallbackReports
from kvstore.client.hf.cache import (LayerLoader, LoadTimeline, PrefixCache, PrefixLoadFailed,
                                     check_supported, pack_blocks)
from kvstore.core.layout import KVLayout

log = logging.getLogger("kvstore.client.hf")


class LayoutMismatch(FailedPrecondition):
    """The model's KV layout differs from the namespace's: its blocks would be misread."""

    default_reason = Reason.LAYOUT_MISMATCH


def layout_for(model, block_tokens: int = 16, tp_rank: int = 0, tp_size: int = 1) -> KVLayout:
    """The block layout of ``model``'s KV, derived from its config and parameter dtype."""
    cfg = model.config.get_text_config(decoder=True)
    check_supported(model.config)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return KVLayout(cfg.num_hidden_layers, kv_heads, head_dim, block_tokens=block_tokens,
                    dtype=str(model.dtype).removeprefix("torch."), tp_rank=tp_rank,
                    tp_size=tp_size)


def weights_digest(model, sample: int = 256) -> str:
    """A cheap fingerprint of the weights (names, shapes and the first values of each tensor).

    Two models with the same config but different weights must never share KV; this catches a
    reused model id pointing at other weights (a fine-tune, a re-initialisation)."""
    h = hashlib.blake2b(digest_size=8)
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.detach().reshape(-1)[:sample].float().cpu().numpy().tobytes())
    return h.hexdigest()


@dataclass
class RequestReport:
    """What the cache did for one generate call."""
    prompt_tokens: int = 0
    reused_tokens: int = 0          # prompt tokens whose KV came from the daemon
    blocks_found: int = 0           # blocks the daemon had (may exceed what was reused)
    blocks_stored: int = 0          # new blocks handed to the store
    tiers: list[str] = field(default_factory=list)
    fallback: str = ""              # why the cache was not used ("" = it was, or a plain miss)
    lookup_s: float = 0.0           # the acquire round trip
    timeline: LoadTimeline | None = None
    store: Future | None = None     # resolves to blocks written (or raises), once stored
    hybrid: object = None           # kvstore.client.hybrid.HybridReport (generate_hybrid)


class HFPrefixCache:
    """Wraps a transformers causal LM so that ``generate`` reuses cached prompt prefixes.

    model:        a loaded causal LM (full-attention layers; batch of one prompt per call).
    model_id:     identifies the weights; defaults to the config's name_or_path. A digest of the
                  weights is appended (``weights_digest``) unless ``fingerprint=False``.
    client:       a KVClient; if omitted, one is created for ``socket`` with ``deadline_s`` as
                  its per-call deadline, lazily again after any failure.
    namespace:    alternatively an existing Namespace; it must match the model's layout.
    layerwise:    overlap the prefix copy with compute (False: copy everything first).
    cooldown_s:   after the daemon missed a deadline, skip it for this long, doubled per
                  consecutive miss up to max(10 s, cooldown_s) (client/link.py Backoff): a
                  hung daemon must not add ``deadline_s`` to every request.

    Concurrent ``generate`` calls from several threads are safe; ``last`` is the latest one's.
    """

    def __init__(self, model, model_id: str | None = None, *, client=None, socket: str | None = None,
                 namespace=None, block_tokens: int = 16, tenant: str = "",
                 deadline_s: float = 2.0, layerwise: bool = True, fingerprint: bool = True,
                 max_pending_stores: int = 4, cooldown_s: float = 5.0):
        self.model = model
        if namespace is not None:
            block_tokens = namespace.layout.block_tokens
        self.layout = layout_for(model, block_tokens)
        if namespace is not None:
            if namespace.layout != self.layout:
                raise LayoutMismatch(f"model layout [{self.layout.describe()}] does not match "
                                     f"namespace layout [{namespace.layout.describe()}]")
            model_id, client = namespace.model_id, namespace.client
        else:
            base = model_id or getattr(model.config, "name_or_path", "") or ""
            if not base:
                raise ValueError("model_id is required: the config names no checkpoint")
            model_id = f"{base}@{weights_digest(model)}" if fingerprint else base
        self.model_id = model_id
        self.tenant = tenant
        self.layerwise = layerwise
        self.deadline_s = deadline_s
        self.cooldown_s = cooldown_s
        self._backoff = Backoff(cooldown_s)      # after deadline misses
        self._backoff_lock = threading.Lock()
        self._socket = socket
        self._client = client
        self._own_client = client is None
        self._ns = namespace
        self._lock = threading.Lock()
        self._store_pool = ThreadPoolExecutor(1, thread_name_prefix="kvstore-hf-store")
        self._pending = threading.BoundedSemaphore(max_pending_stores)
        self._stats_lock = threading.Lock()
        self.stats: Counter = Counter()
        # fallbacks not yet told to the daemon: sent once it answers (after an outage too)
        self._reports = FallbackReports()
        self.last: RequestReport | None = None
        try:
            self._namespace()
        except LayoutMismatch:
            raise
        except KVStoreError as exc:
            log.warning("kvstore daemon not available yet (%s); generating without the cache "
                        "until it is", exc)

    # -- connection --------------------------------------------------------------------------
    def _namespace(self):
        """The namespace, (re)connecting if needed. Raises KVStoreError if the daemon is away."""
        with self._lock:
            if self._ns is not None:
                return self._ns
            if self._client is None:
                from kvstore.client.sdk import KVClient
                self._client = KVClient(self._socket, timeout_s=self.deadline_s,
                                        client_name=f"hf:{self.model_id}")
            try:
                self._ns = self._client.namespace(self.model_id, self.layout, self.tenant)
            except FailedPrecondition as exc:
                if exc.reason == Reason.LAYOUT_MISMATCH:
                    raise LayoutMismatch(str(exc)) from None
                raise
            return self._ns

    def close(self) -> None:
        self._store_pool.shutdown(wait=True)
        if self._own_client and self._client is not None:
            self._client.close()

    def __enter__(self) -> "HFPrefixCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the request path --------------------------------------------------------------------
    def _begin(self, input_ids, kwargs: dict, entry: str):
        """Common start of a request: (ids as [1, n], its report), or (ids, None) when the
        request runs uncached — a batch of several prompts or a padded attention mask."""
        if "past_key_values" in kwargs:
            raise ValueError(f"HFPrefixCache.{entry} builds past_key_values itself")
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        report = RequestReport(prompt_tokens=ids.shape[1])
        self.last = report
        mask = kwargs.get("attention_mask")
        if ids.shape[0] != 1 or (mask is not None and not bool(mask.all())):
            self._count("bypass")
            return ids, None
        self._count("requests")
        self._count("prompt_tokens", report.prompt_tokens)
        kwargs.setdefault("attention_mask", torch.ones_like(ids))
        return ids, report

    def generate(self, input_ids: torch.Tensor, **kwargs):
        """``model.generate(input_ids, **kwargs)`` with the cached prefix reused.

        Returns exactly what model.generate returns. ``past_key_values`` must not be passed.
        Batches of more than one prompt run uncached (counted as ``bypass``)."""
        ids, report = self._begin(input_ids, kwargs, "generate")
        if report is None:
            return self.model.generate(ids, **kwargs)
        cache, keys = self._prepare(ids, report)
        try:
            out = self.model.generate(ids, past_key_values=cache, **kwargs)
        except PrefixLoadFailed as exc:
            self._fallback(report, "stale", exc)
            cache, _ = self._fresh_cache(ids, keys, report, blocks_found=0)
            out = self.model.generate(ids, past_key_values=cache, **kwargs)
        except Exception as exc:  # noqa: BLE001
            if cache.loader is None:
                raise  # nothing of ours was involved: the caller's error
            # Defensive: whatever went wrong with the restored prefix, recompute without it.
            # A genuine caller error fails again below and propagates.
            self._fallback(report, "error", exc)
            return self.model.generate(ids, **kwargs)
        cache.finish_prefill()  # a single-forward generation never started a second pass
        if cache.loader is not None and not report.fallback:
            self._count("hits")
            self._count("reused_tokens", report.reused_tokens)
        return out

    def generate_hybrid(self, input_ids: torch.Tensor, profile, **kwargs):
        """``generate`` with partial recomputation (client/hybrid.py): the daemon's planner
        picks k from the blocks' tiers and bandwidths and ``profile`` (this model's
        kvstore.planner.recompute.PrefillProfile); tokens [0, k) are recomputed while blocks [k, N) load,
        meeting earlier or later if the load runs faster or slower than planned. Any cache
        failure degrades to a full recompute (counted); new full blocks are stored afterwards."""
        from kvstore.client.hybrid import HybridPrefill

        ids, report = self._begin(input_ids, kwargs, "generate_hybrid")
        if report is None:
            return self.model.generate(ids, **kwargs)
        cache = keys = None
        try:
            if self._cooling():
                raise _Cooldown("the daemon missed a deadline recently")
            ns = self._namespace()
            keys = ns.block_keys(ids[0].tolist())
            cache, hrep = HybridPrefill(self.model, ns, profile).prefix_cache(ids, keys=keys)
            report.hybrid = hrep
            report.blocks_found = hrep.cached_blocks
            report.tiers = list(hrep.plan.tiers) if hrep.plan is not None else []
            report.reused_tokens = hrep.loaded_blocks * self.layout.block_tokens
            self._daemon_answered()
            self._report_fallbacks(ns)
        except Exception as exc:  # noqa: BLE001 - the cache never fails inference
            self._fallback(report, "cooldown" if isinstance(exc, _Cooldown) else _reason(exc),
                           exc, quiet=isinstance(exc, _Cooldown))
            self._daemon_missed(report)
            return self.model.generate(ids, **kwargs)
        out = self.model.generate(ids, past_key_values=cache, **kwargs)
        self._count("hits" if report.blocks_found else "misses")
        self._count("reused_tokens", report.reused_tokens)
        if keys and report.blocks_found < len(keys):
            try:
                report.store = self.store(ids, cache)
            except Exception as exc:  # noqa: BLE001
                self._count("store_failures")
                log.warning("kvstore: storing after a hybrid prefill failed: %s", exc)
        return out

    def _prepare(self, ids: torch.Tensor, report: RequestReport):
        """Lease the cached prefix and build the cache object; any failure → plain cache."""
        B = self.layout.block_tokens
        n = ids.shape[1]
        keys: list[bytes] = []
        if self._cooling():
            self._fallback(report, "cooldown", "the daemon missed a deadline recently",
                           quiet=True)
            return self._fresh_cache(ids, keys, report, 0)
        try:
            ns = self._namespace()
            keys = ns.block_keys(ids[0].tolist())
            if not keys:
                return self._fresh_cache(ids, keys, report, 0)
            t = time.perf_counter()
            if ns.client.shared_memory:
                lease = ns.acquire(keys[:ns.client.max_batch_blocks])
            else:  # a remote daemon: the bytes stream over gRPC before compute starts
                lease = _FetchedPrefix(ns.get(keys[:min(ns.client.max_batch_blocks,
                                                        (n - 1) // B)]).result())
            report.lookup_s = time.perf_counter() - t
            self._daemon_answered()
            self._report_fallbacks(ns)        # the daemon answered: what it missed meanwhile
        except LayoutMismatch as exc:
            self._fallback(report, "layout", exc)
            return self._fresh_cache(ids, keys, report, 0)
        except Exception as exc:  # noqa: BLE001 - the cache never fails inference
            self._fallback(report, _reason(exc), exc)
            self._daemon_missed(report)
            return self._fresh_cache(ids, keys, report, 0)
        report.blocks_found = len(lease)
        report.tiers = list(lease.tiers)
        use = min(len(lease), (n - 1) // B)  # the last prompt token is always computed
        if use == 0:
            _release_quietly(lease)
            return self._fresh_cache(ids, keys, report, len(lease))
        report.reused_tokens = use * B
        timeline = LoadTimeline()
        report.timeline = timeline
        reconnects = ns.client.reconnects

        def release():
            lease.release()  # StaleRead if it expired: then the copy must not be used
            if ns.client.reconnects != reconnects:
                raise PrefixLoadFailed("client reconnected while the prefix was being read")

        try:
            views = lease.views("torch")
            loader = LayerLoader(views, lease.offsets, self.layout, use, release, timeline,
                                 extra_tokens=n - report.reused_tokens,
                                 device=self.model.device)
        except Exception as exc:  # noqa: BLE001 - e.g. no shared arena (remote daemon)
            _release_quietly(lease)
            self._fallback(report, _reason(exc), exc)
            return self._fresh_cache(ids, keys, report, 0)
        loader.start()
        if not self.layerwise:
            loader.join()
        cache = PrefixCache(self.model.config, loader, report.reused_tokens, timeline,
                            self._store_hook(keys, len(lease), report))
        return cache, keys

    def _fresh_cache(self, ids, keys, report, blocks_found: int):
        if not report.fallback:
            self._count("misses")
        return PrefixCache(self.model.config, None, 0, LoadTimeline(),
                           self._store_hook(keys, blocks_found, report)), keys

    def _cooling(self) -> bool:
        with self._backoff_lock:
            return self._backoff.waiting()

    def _daemon_missed(self, report: RequestReport) -> None:
        """After a fallback: a missed deadline starts (or doubles) the cooldown."""
        if report.fallback == "deadline":
            with self._backoff_lock:
                self._backoff.failed()

    def _daemon_answered(self) -> None:
        with self._backoff_lock:
            self._backoff.succeeded()

    def _fallback(self, report: RequestReport, reason: str, exc, quiet: bool = False) -> None:
        report.fallback = reason
        report.reused_tokens = 0
        self._count("fallbacks")
        self._count(f"fallback_{reason}")
        self._reports.record(report.prompt_tokens // self.layout.block_tokens)
        if reason not in ("deadline", "unavailable", "cooldown") and self._ns is not None:
            self._report_fallbacks(self._ns)  # the daemon is answering: tell it now
        (log.debug if quiet else log.warning)(
            "kvstore: recomputing the whole prompt (%s): %s", reason, exc)

    def _report_fallbacks(self, ns) -> None:
        if self._reports.pending()[0]:
            self._reports.flush(ns.client, ns.namespace_id)

    # -- storing -----------------------------------------------------------------------------
    def _store_hook(self, keys: list[bytes], blocks_found: int, report: RequestReport):
        """Called with the cache once the prompt's KV is complete (after the first token)."""
        if report.fallback in _NO_STORE or blocks_found >= len(keys):
            return None  # nothing new, or a daemon that just failed us would fail this too

        def hook(cache: PrefixCache) -> None:
            if not self._pending.acquire(blocking=False):
                self._count("stores_skipped")  # the store is behind: never queue unbounded
                return
            # Reference (not copy) the layers: DynamicLayer.update concatenates into new
            # tensors, so these stay the prompt's KV while decoding goes on.
            layers = [(layer.keys, layer.values) for layer in cache.layers]
            report.blocks_stored = len(keys) - blocks_found
            report.store = self._store_pool.submit(self._store, layers, keys, blocks_found)
        return hook

    def store(self, input_ids: torch.Tensor, cache) -> Future:
        """Store the full blocks of ``input_ids`` whose KV ``cache`` holds (computed elsewhere,
        e.g. by a plain ``model.generate``); blocks the daemon already has are skipped.
        Returns a Future of the number of blocks written."""
        ids = torch.as_tensor(input_ids).reshape(-1).tolist()
        ns = self._namespace()
        keys = ns.block_keys(ids)
        if cache.get_seq_length() < len(keys) * self.layout.block_tokens:
            raise ValueError(f"cache holds {cache.get_seq_length()} tokens, fewer than the "
                             f"{len(keys) * self.layout.block_tokens} of the full blocks")
        found = ns.lookup(keys).num_cached
        if found >= len(keys):
            done: Future = Future()
            done.set_result(0)
            return done
        self._pending.acquire()
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        return self._store_pool.submit(self._store, layers, keys, found)

    def _store(self, layers, keys: list[bytes], first: int) -> int:
        try:
            kv = pack_blocks(layers, self.layout, first * self.layout.block_tokens,
                             len(keys) - first)
            ns = self._namespace()
            step = ns.client.max_batch_blocks
            written = 0
            for s in range(first, len(keys), step):
                e = min(len(keys), s + step)
                written += ns.put(keys[s:e], kv[s - first:e - first],
                                  parent_key=keys[s - 1] if s else None).result()
            self._count("blocks_stored", written)
            return written
        except Exception as exc:  # noqa: BLE001 - a failed store only costs a future hit
            self._count("store_failures")
            log.warning("kvstore: storing %d blocks failed: %s", len(keys) - first, exc)
            raise
        finally:
            self._pending.release()

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every store handed off so far has finished (tests, benchmarks)."""
        self._store_pool.submit(lambda: None).result(timeout_s)

    @property
    def hit_rate(self) -> float:
        """Reused prompt tokens / prompt tokens, over all requests so far."""
        return self.stats["reused_tokens"] / max(1, self.stats["prompt_tokens"])


class _FetchedPrefix:
    """Blocks already copied out by ``Namespace.get``, shaped like a BlockLease for the loader."""

    def __init__(self, kv: torch.Tensor):
        self._rows = kv.reshape(len(kv), -1).view(torch.uint8) if len(kv) else kv
        self.offsets = [i * self._rows.shape[1] for i in range(len(kv))]
        self.tiers: list[str] = []

    def __len__(self) -> int:
        return len(self.offsets)

    def views(self, like: str = "torch"):
        return [self._rows[i] for i in range(len(self.offsets))]

    def release(self) -> None:
        """Nothing to do: ``get`` released (and validated) its lease before returning."""


class _Cooldown(RuntimeError):
    pass


_NO_STORE = ("layout", "deadline", "unavailable", "cooldown")


def _reason(exc: BaseException) -> str:
    name = type(exc).__name__
    return {"Timeout": "deadline", "Unavailable": "unavailable", "StaleRead": "stale"}.get(
        name, "error")


def _release_quietly(lease) -> None:
    try:
        lease.release()
    except KVStoreError:
        pass
