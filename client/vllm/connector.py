"""The vLLM connector: scheduler and worker halves of KVConnectorBase_V1 (see the package
docstring for the protocol, in vLLM's call order)."""
from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1,
                                                               KVConnectorMetadata,
                                                               KVConnectorRole)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvstore.client import KVLayout, Reason
from kvstore.client.adapter_config import VLLM_FIELDS, parse_extra_config
from kvstore.core.keys import chain_keys, namespace_digest
from kvstore.client.link import DaemonLink
from kvstore.client.layerwise import LayerLoad, Loader
from kvstore.client.vllm.stats import Counters, KVStoreConnectorStats, engine_time
from kvstore.kernels.pages import PageFormat, page_format_for
from kvstore.planner.prefix_load import plan_prefix_load
from kvstore.planner.recompute import PrefillProfile

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

# Tiers a hit loads from whole, without asking the planner: reading them costs far less than
# computing any block.
_FAST_TIERS = frozenset({"HBM", "DRAM"})

# Under "vllm." so that vLLM's log handlers show the connector's messages.
log = logging.getLogger("vllm.kvstore_connector")

# ---------------------------------------------------------------------------------------------
# Metadata (scheduler -> worker)
# ---------------------------------------------------------------------------------------------
@dataclass
class LoadSpec:
    req_id: str
    keys: list[bytes]          # keys of the blocks to load, in chain order
    block_ids: list[int]       # vLLM block receiving each
    sync: bool = False         # load before this step's forward (the request runs in it)
    stream: bool = False       # sync, its SSD blocks arriving layer by layer (AcquireLayers)


@dataclass
class StoreSpec:
    keys: list[bytes]
    parent_key: bytes          # key before keys[0] (b"" at the chain root)
    block_ids: list[int]
    req_id: str = ""


@dataclass
class KVStoreConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    stores: list[StoreSpec] = field(default_factory=list)



# ---------------------------------------------------------------------------------------------
# The connector
# ---------------------------------------------------------------------------------------------
@dataclass
class _ReqState:
    keys: list[bytes]          # keys of the full blocks known so far (prompt, then generated)
    stored: int                # blocks [0, stored) are in kvstore or their put was issued
    block_ids: list[int] = field(default_factory=list)
    request: Any = None        # the scheduler's Request: its all_token_ids grow as it decodes
    store_issued: bool = False  # a StoreSpec went to the workers (a producer then waits for it)
    request_id: str = ""


@dataclass
class _Flush:
    """A finished producer request's wait for its blocks to reach the cluster tier."""
    future: Future | None      # of a RemotePlacement; None: nothing to wait for
    deadline: float
    blocks: int


@dataclass
class _Load:
    spec: LoadSpec
    future: Future
    deadline: float
    device_bytes: int = 0      # its landing buffer's share of device_staging_bytes


@dataclass
class _SyncLoad:
    """One synchronous load of this step, until its proof is checked (_finish_sync_loads)."""
    spec: LoadSpec
    read: Any = None           # the ArenaRead its leading blocks come from (None: no daemon)
    local: int = 0             # blocks [0, local) scattered from the arena's slots
    leased: int = 0            # then [local, local + leased) from a leased get
    layers: Any = None         # a streamed load's kvstore LayerLease (None: not streamed)


class KVStoreConnector(KVConnectorBase_V1):
    _cache_hit_source = CacheHitSource.HOST  # the DRAM tier (SSD hits are promoted first)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped store is just a future miss

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        # The keys, their types and defaults: kvstore.client.adapter_config.VLLM_FIELDS.
        self.cfg = parse_extra_config(VLLM_FIELDS,
                                      self._kv_transfer_config.kv_connector_extra_config,
                                      "KVStoreConnector kv_connector_extra_config")
        self.block_size = vllm_config.cache_config.block_size
        self.layer_names, self.layout = _layout_from(vllm_config, kv_cache_config, role)
        if self.cfg["quant"]:
            self.layout = dataclasses.replace(self.layout, quant=self.cfg["quant"])  # validated
        self.model_id = self.cfg["model_id"] or vllm_config.model_config.model
        self.counters = Counters()
        # Disaggregated prefill/decode (the cluster tier carries KV between hosts): a producer
        # (prefill) only stores, a consumer (decode) only loads; kv_both does both.
        kv_role = self._kv_transfer_config.kv_role or "kv_both"
        if kv_role not in ("kv_both", "kv_producer", "kv_consumer"):
            raise ValueError(f"KVStoreConnector: kv_role must be kv_both, kv_producer or "
                             f"kv_consumer, got {kv_role!r}")
        self.loads_enabled = kv_role != "kv_producer"
        self.stores_enabled = kv_role != "kv_consumer"
        if role == KVConnectorRole.SCHEDULER:
            # kvstore is a cache: a failed load is a miss to recompute, never a failed request.
            if self._kv_transfer_config.kv_load_failure_policy != "recompute":
                log.info("KVStoreConnector: kv_load_failure_policy set to 'recompute'")
                self._kv_transfer_config.kv_load_failure_policy = "recompute"
            self.link = DaemonLink(self.cfg, self.model_id, self.layout, "vllm-scheduler", log)
            self._reqs: dict[str, _ReqState] = {}
            self._lookups: dict[str, tuple[int, int]] = {}  # req -> (computed, hit blocks)
            self._pending_loads: list[LoadSpec] = []
            self._seed = namespace_digest(self.model_id, self.layout, self.cfg["tenant"])
            # This engine's prefill cost, for the partial-load decision (_blocks_to_load).
            self._profile = (PrefillProfile(*self.cfg["prefill_profile"])
                             if self.cfg["prefill_profile"] else None)
        else:
            self.link = DaemonLink(self.cfg, self.model_id, self.layout,
                                   f"vllm-worker-tp{self.layout.tp_rank}", log)
            self.pages: PageFormat | None = None
            self._kv: list[torch.Tensor] = []
            self._loads: list[_Load] = []
            self._load_errors: set[int] = set()
            self._unreported: list = []    # synchronous loads' reads (kvstore ArenaRead)
            # This step's synchronous loads and their scatter (layer by layer on the loader
            # thread, or all of it before the forward): _start_sync_loads .. _finish_sync_loads
            self._sync: list[_SyncLoad] = []
            self._layer_load: LayerLoad | None = None
            self._layer_index = {n: i for i, n in enumerate(self.layer_names)}
            self._layerwise = self.cfg["layerwise_load"]
            self._loader = Loader()
            self._sync_failed = False      # a synchronous load of this step failed
            self._stores: list[tuple[Future, int]] = []
            self._pending_store_bytes = 0
            # GPU engines: device bytes held by staging (unfinished puts' gathered blocks,
            # asynchronous loads' landing buffers), bounded by device_staging_bytes
            self._device_staging = 0
            # kv_producer: keys each request stored (by request id), then the flushes of the
            # finished ones; a request is reported finished (finished_sending) once its
            # blocks are readable from the cluster tier, or its flush timed out
            self._producer_keys: dict[str, list[bytes]] = {}
            self._flushes: dict[str, _Flush] = {}

    # =========================================================================================
    # Scheduler side
    # =========================================================================================
    @engine_time("lookup_us")
    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        st = self._state(request)    # a producer needs it too: it names the blocks to store
        if st is None or not self.loads_enabled:
            return 0, False
        # At least the prompt's last token is recomputed: vLLM needs its logits.
        usable = min(len(st.keys), (len(request.prompt_token_ids) - 1) // self.block_size)
        first = num_computed_tokens // self.block_size
        if usable <= first:
            self._skip_held(st, first)
            return 0, False
        hit, tiers = self._lookup(st.keys[:usable])
        st.stored = max(st.stored, hit)
        if hit <= first:
            return 0, False
        hit = first + self._blocks_to_load(st.keys[:hit], tiers, num_computed_tokens,
                                           len(request.prompt_token_ids))
        if hit <= first:
            return 0, False
        stream = self._streams(tiers[first:hit])
        sync = stream or self._loads_now(tiers[first:hit])
        self._lookups[request.request_id] = (num_computed_tokens, hit, sync, stream)
        return hit * self.block_size - num_computed_tokens, not sync

    def _skip_held(self, st: _ReqState, first: int) -> None:
        """vLLM's own prefix cache serves the first ``first`` blocks and nothing is left to
        load: the blocks of them the store already holds are not stored again. Without this
        every request served by vLLM's cache (on by default) copied its whole prefix out of
        the pages on the engine thread and sent it to the daemon, which kept none of it
        (13 ms per request for a 32 MiB prefix, measured). One lookup per request, answered
        from the index snapshot; a daemon that cannot answer changes nothing (the blocks are
        stored, as before)."""
        if not self.stores_enabled or st.stored >= first:
            return
        ns = self.link.namespace(self.cfg["lookup_timeout_s"])
        if ns is None:
            return
        try:
            held = ns.lookup(st.keys[:first]).num_cached
        except Exception as exc:  # noqa: BLE001 - the stores then go ahead
            self.link.failed(exc)
            return
        st.stored = max(st.stored, held)

    def _blocks_to_load(self, keys: list[bytes], tiers: list[str], computed: int,
                        prompt_tokens: int) -> int:
        """How many of the hit's blocks [computed / block_size, len(keys)) to load; vLLM computes
        the rest of the prompt. All of them when every one is in this host's DRAM (a DRAM load
        costs less than computing any block) or no prefill_profile is configured. Otherwise the
        daemon's planner answers each tier's measured read bandwidth (and the blocks' tiers, fresh)
        and kvstore.planner.prefix_load picks the prefix whose load plus the compute of the rest
        is shortest: a slow tier's blocks are computed when that is faster than reading them.
        The planner has lookup_timeout_s, as the lookup (the scheduler waits for it): a daemon
        that has read nothing yet measures its disk on the request's blocks, and one too slow
        to answer in time is a disk too slow to load from, so the hit is computed. Any other
        planner error loads all the lookup found. Both count plan_failures."""
        first = computed // self.block_size
        n = len(keys) - first
        if self._profile is None or all(t in _FAST_TIERS for t in tiers[first:]):
            return n
        ns = self.link.namespace(self.cfg["lookup_timeout_s"])
        try:
            if ns is None:
                raise ConnectionError("daemon unavailable")
            plan = ns.plan_recompute(keys, self._profile, timeout_s=self.cfg["lookup_timeout_s"])
            cached = min(plan.num_cached, len(keys), len(plan.tiers))
            bw = dict(plan.bandwidth_bps or {})
            bw.setdefault("HBM", bw.get("DRAM", 0.0))   # HBM blocks have a DRAM copy too
            tiers_hit = list(plan.tiers[first:cached])
            # A load that will stream (_streams) overlaps the forward layer by layer.
            overlap = self.layout.num_layers if self._streams(tiers_hit) else 0
            decision = plan_prefix_load(tiers_hit, self.block_size, self.layout.block_bytes, bw,
                                        self._profile, computed, prompt_tokens,
                                        overlap_layers=overlap)
        except Exception as exc:  # noqa: BLE001 - the plan is advice: without it, load
            timed_out = getattr(exc, "reason", None) == Reason.TIMEOUT
            log.debug("KVStoreConnector: no plan (%s); %s the hit", exc,
                      "computing" if timed_out else "loading")
            self.counters.add(plan_failures=1)
            return 0 if timed_out else n
        self.counters.add(plans=1, planned_recompute_blocks=n - decision.load_blocks)
        return decision.load_blocks

    def _loads_now(self, tiers: list[str]) -> bool:
        """Load in the step that schedules the request (vLLM's synchronous load) rather than
        while the engine steps on (asynchronous): when every block is in this host's DRAM
        arena and the hit is small. Such a load is a lease-free read of the arena straight
        into the engine's pages on the engine's own thread, shorter than an engine step; an
        asynchronous one costs the request at least one extra step, and its copy on the SDK's
        threads starves behind the engine's busy loop (docs/integrations/vllm.md, "Load
        modes"). Slow bytes (SSD, the cluster tier, another host's stream) and big hits stay
        asynchronous: the engine keeps serving other requests while they arrive."""
        if self.layout.quant or not tiers or not all(t == "DRAM" for t in tiers):
            return False       # quantized blocks are unpacked by the SDK: its threads' work
        if len(tiers) * self.layout.block_bytes > self.cfg["sync_load_max_bytes"]:
            return False
        ns = self.link.namespace(self.cfg["lookup_timeout_s"])
        return ns is not None and ns.client.datapath.shared_memory

    def _streams(self, tiers: list[str]) -> bool:
        """Load a hit with SSD blocks in the step that schedules it, its SSD blocks arriving
        layer by layer while the forward computes the layers already in place
        (stream_slow_loads, with layerwise_load): the forward then waits only for the layer
        it is about to run, not for the whole read, and the planner counts the overlap
        (_blocks_to_load). Only what this host's SSD tier and DRAM arena hold, at most
        sync_load_max_bytes."""
        if not (self.cfg["stream_slow_loads"] and self.cfg["layerwise_load"]) \
                or self.layout.quant or "SSD" not in tiers \
                or not all(t in ("DRAM", "SSD") for t in tiers):
            return False
        if len(tiers) * self.layout.block_bytes > self.cfg["sync_load_max_bytes"]:
            return False
        ns = self.link.namespace(self.cfg["lookup_timeout_s"])
        return ns is not None and ns.client.datapath.shared_memory

    def _state(self, request: "Request") -> _ReqState | None:
        st = self._reqs.get(request.request_id)
        if st is None:
            toks = request.prompt_token_ids
            if toks is None or getattr(request, "lora_request", None) is not None:
                return None  # prompt embeddings / LoRA: the token ids do not name the KV
            # Keys derive from the namespace digest, computed locally: no daemon call.
            st = _ReqState(keys=chain_keys(self._seed, toks, self.block_size), stored=0,
                           request=request if self.cfg["store_generated"] else None,
                           request_id=request.request_id)
            self._reqs[request.request_id] = st
        return st

    def _lookup(self, keys: list[bytes]) -> tuple[int, list[str]]:
        """(cached prefix length, tier of each of those blocks); a daemon error is a miss."""
        ns = self.link.namespace(self.cfg["lookup_timeout_s"])
        if ns is None:
            self.counters.add(lookups=1, miss_blocks=len(keys), fallbacks=1)
            self.link.fallback(len(keys))    # told to the daemon once it answers again
            return 0, []
        try:
            r = ns.lookup(keys)
        except Exception as exc:  # noqa: BLE001
            self.link.failed(exc)
            self.counters.add(lookups=1, miss_blocks=len(keys), fallbacks=1)
            self.link.fallback(len(keys))
            return 0, []
        hit = r.num_cached
        self.counters.add(lookups=1, hit_blocks=hit, miss_blocks=len(keys) - hit)
        return hit, r.tiers

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int):
        if num_external_tokens <= 0:
            return
        computed, _hit, sync, stream = self._lookups.pop(request.request_id,
                                                         (0, 0, False, False))
        st = self._reqs[request.request_id]
        first = computed // self.block_size
        last = (computed + num_external_tokens) // self.block_size
        block_ids = blocks.get_block_ids()[0]
        self._pending_loads.append(LoadSpec(request.request_id, st.keys[first:last],
                                            list(block_ids[first:last]), sync, stream))
        self.counters.add(hit_tokens=num_external_tokens, sync_loads=int(sync),
                          async_loads=int(not sync))

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = KVStoreConnectorMetadata(loads=self._pending_loads)
        self._pending_loads = []
        if not self.stores_enabled:
            return meta
        sched = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0])
            self._add_store(meta, st, new.num_computed_tokens + sched.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None or (st.request is None and st.stored >= len(st.keys)):
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                st.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                st.block_ids.extend(new_ids[0])
            self._add_store(meta, st, cached.num_computed_tokens[i] + sched.get(req_id, 0))
        return meta

    def _add_store(self, meta: KVStoreConnectorMetadata, st: _ReqState,
                   computed_after_step: int) -> None:
        complete = min(computed_after_step // self.block_size, len(st.block_ids))
        if st.request is not None and complete > len(st.keys):
            # Decoding: blocks past the prompt hold generated tokens whose KV this step computed.
            # Their keys continue the prompt's chain, so a later prompt that repeats the
            # conversation (the next chat turn) finds them.
            bs = self.block_size
            toks = st.request.all_token_ids[len(st.keys) * bs:complete * bs]
            st.keys += chain_keys(st.keys[-1] if st.keys else self._seed, list(toks), bs)
        end = min(len(st.keys), complete)
        if end <= st.stored:
            return
        meta.stores.append(StoreSpec(st.keys[st.stored:end],
                                     st.keys[st.stored - 1] if st.stored else b"",
                                     st.block_ids[st.stored:end], st.request_id))
        st.stored = end
        st.store_issued = True

    def request_finished(self, request: "Request",
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        st = self._reqs.pop(request.request_id, None)
        self._lookups.pop(request.request_id, None)
        # Stores were issued (and their pages copied out) as blocks completed. A producer's
        # request is reported finished only once the workers say its blocks reached the
        # cluster tier (get_finished's finished_sending), so a consumer that waits for it
        # finds them; vLLM holds the request (and its blocks) until then.
        delay = not self.loads_enabled and st is not None and st.store_issued
        return delay, None

    # =========================================================================================
    # Worker side
    # =========================================================================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        missing = [n for n in self.layer_names if n not in kv_caches]
        if missing:
            raise ValueError(f"KVStoreConnector: no KV cache tensor for layers {missing}")
        static = self._vllm_config.compilation_config.static_forward_context
        backend = getattr(static.get(self.layer_names[0]), "attn_backend", None)
        name = backend.get_name() if backend is not None else "?"
        self.pages = page_format_for(name, self.layout)  # raises on an unknown page format
        self._kv = [self.pages.canonical(kv_caches[n]) for n in self.layer_names]
        log.info("KVStoreConnector: %d layers, %s pages, %s", len(self._kv), name,
                 self.layout.describe())

    @engine_time("load_us")
    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, KVStoreConnectorMetadata):
            return
        self._sync_failed = False
        self._start_sync_loads([s for s in meta.loads if s.sync])
        for spec in meta.loads:
            if spec.sync:
                continue
            ns = self.link.namespace()
            dev_bytes = 0
            if ns is None:
                fut: Future = Future()
                fut.set_exception(ConnectionError("daemon unavailable"))
            else:
                try:
                    # Staging on the KV cache's device: on a GPU engine the get is one DMA per
                    # run from the pinned arena, or device to device from the HBM tier. Device
                    # staging is bounded (device_staging_bytes); beyond it the blocks land in
                    # host memory and get_finished copies them up.
                    dev = self._kv[0].device
                    nbytes = len(spec.keys) * self.layout.block_bytes
                    if dev.type != "cpu":
                        if self._device_staging + nbytes <= self.cfg["device_staging_bytes"]:
                            dev_bytes = nbytes
                        else:
                            dev = torch.device("cpu")
                    out = torch.empty((len(spec.keys), *self.layout.block_shape),
                                      dtype=getattr(torch, self.layout.dtype), device=dev)
                    fut = ns.get(spec.keys, out=out)
                except Exception as exc:  # noqa: BLE001
                    self.link.failed(exc)
                    fut = Future()
                    fut.set_exception(exc)
                    dev_bytes = 0
            self._device_staging += dev_bytes
            self._loads.append(_Load(spec, fut, time.monotonic() + self.cfg["load_timeout_s"],
                                     dev_bytes))

    def _start_sync_loads(self, specs: list[LoadSpec]) -> None:
        """Synchronous loads (see _loads_now), before the forward: the blocks in this host's
        DRAM arena go straight from their slots into the engine's pages (Namespace.read_local:
        views of the slots, proven after the copy by their generations); the rest, if the
        lookup's answer went stale (evicted, demoted), through an SDK get this thread waits
        for. On a CPU engine the scatter runs layer by layer on the loader thread while the
        forward runs (wait_for_layer_load waits for one layer; kvstore.client.layerwise);
        otherwise it is done here, all of it. _finish_sync_loads checks the proofs after the
        forward."""
        self._finish_sync_loads()          # a previous step's, were it still open
        segments: list[tuple[list[int], torch.Tensor]] = []
        for spec in specs:
            sl = _SyncLoad(spec)
            self._sync.append(sl)
            ns = self.link.namespace()
            if ns is None:
                continue
            if spec.stream:
                try:
                    # Every block through one layer-wise lease: its SSD blocks' layers land in
                    # their slots while the forward runs; each segment waits for its layer.
                    sl.layers = ns.acquire_layers(spec.keys, self.cfg["load_timeout_s"])
                    for first, count, rows in sl.layers.runs():
                        segments.append((spec.block_ids[first:first + count],
                                         self._blocks_of(rows, count), sl.layers.wait_layer))
                    self.counters.add(streamed_loads=1, streamed_blocks=len(sl.layers))
                except Exception as exc:  # noqa: BLE001
                    self.link.failed(exc)
                continue
            try:
                sl.read = ns.read_local(spec.keys)
                # Slots already reused (or generations already stale) go through the leased
                # get now, not as load errors after the forward.
                usable = sl.read.valid_now()
                for first, count, rows in sl.read.runs:
                    count = min(count, usable - first)
                    if count <= 0:
                        break
                    segments.append((spec.block_ids[first:first + count],
                                     self._blocks_of(rows[:count], count)))
                    sl.local = first + count
                if sl.local < len(spec.keys):
                    kv = self._get_leased(ns, spec, sl.local)
                    sl.leased = int(kv.shape[0])
                    if sl.leased:
                        segments.append((spec.block_ids[sl.local:sl.local + sl.leased], kv))
            except Exception as exc:  # noqa: BLE001
                self.link.failed(exc)
        if not segments:
            return
        job = LayerLoad(self.pages, self._kv, segments)
        if self._layerwise and self._kv[0].device.type == "cpu":
            self._layer_load = job
            self._loader.submit(job)
            self.counters.add(layerwise_loads=len(specs))
        else:
            # Whole, before the forward: on a GPU engine (docs/integrations/vllm.md, "On a GPU
            # engine: what runs where"), or with layerwise_load off. The forward waits for
            # nothing.
            job.run_inline()
            self._layer_load = job

    def _get_leased(self, ns, spec: LoadSpec, first: int) -> torch.Tensor:
        """Blocks [first, ...) through an SDK get (leased), which this thread waits for: the
        lookup's answer went stale (evicted, demoted, a slot reused)."""
        out = torch.empty((len(spec.keys) - first, *self.layout.block_shape),
                          dtype=getattr(torch, self.layout.dtype), device=self._kv[0].device)
        kv = ns.get(spec.keys[first:], out=out).result(self.cfg["load_timeout_s"])
        self.counters.add(sync_reread_blocks=int(kv.shape[0]))
        return kv

    def _finish_sync_loads(self) -> None:
        """(after the forward; idempotent) Wait until the scatter is done with every page and
        slot, then check each load's proof: blocks [proven, ...) of a read may hold torn bytes
        and, with everything after them, go to get_block_ids_with_load_errors (vLLM drops
        this step's output for their requests and recomputes them). All of a job's blocks
        fail when its scatter failed or the forward read a layer it had not waited for."""
        job, self._layer_load = self._layer_load, None
        ok = True
        if job is not None:
            ok = job.finish()
            if job.error is not None:
                log.warning("KVStoreConnector: writing loaded blocks failed: %s", job.error)
            elif not ok:
                # vLLM did not call wait_for_layer_load before some layer's attention (a model
                # whose attention is not wrapped by its KV-transfer hook): load whole from now on.
                log.warning("KVStoreConnector: the forward did not wait for %d of %d layers; "
                            "loading every layer before the forward from now on",
                            job.unwaited_layers, len(self._kv))
                self._layerwise = False
                self.counters.add(layer_wait_misses=1)
        for sl in self._sync:
            found = 0
            if sl.layers is not None:
                # Verified by the daemon once every layer was in, proven by the slots'
                # generations now: blocks after that prefix fed this forward bytes that may be
                # wrong, so the step's output for them is dropped (load errors, recomputed).
                try:
                    found = sl.layers.finish()
                    sl.layers.release()
                except Exception as exc:  # noqa: BLE001
                    self.link.failed(exc)
                    found = 0
            if sl.read is not None:
                # The daemon hears of the reads after this step (get_finished): on a small
                # host its work, and the report thread's, would slow the forward.
                proven = sl.read.verify(report=False)
                self._unreported.append(sl.read)
                found = sl.local + sl.leased if proven >= sl.local else proven
            if not ok:
                found = 0
            self._sync_failed |= found < len(sl.spec.block_ids)
            self._account_load(sl.spec.block_ids, found)
        self._sync = []

    def _blocks_of(self, rows: torch.Tensor, count: int) -> torch.Tensor:
        """[count, block_bytes] uint8 arena rows as [count, *block_shape] blocks (a view)."""
        return rows.view(getattr(torch, self.layout.dtype)).view(count, *self.layout.block_shape)

    def wait_for_layer_load(self, layer_name: str) -> None:
        # This step's synchronous loads, scattered layer by layer (_start_sync_loads); an
        # asynchronous load finished before its request's forward (get_finished).
        job = self._layer_load
        if job is not None:
            i = self._layer_index.get(layer_name)
            if i is not None:
                job.wait(i)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata,
                      **kwargs: Any) -> None:
        return  # stores are taken in wait_for_save, once the whole forward has run

    @engine_time("save_us")
    def wait_for_save(self):
        self._finish_sync_loads()
        self._reap_stores()
        meta = self._connector_metadata
        if not isinstance(meta, KVStoreConnectorMetadata) or not meta.stores:
            return
        if self._sync_failed:
            # This step's forward read the blocks that failed to load (their requests', and
            # those of any request sharing them through vLLM's prefix cache): KV it computes
            # on top of them is wrong and must not be stored. vLLM recomputes it next step.
            self.counters.add(store_skipped_blocks=sum(len(s.keys) for s in meta.stores))
            meta.stores = []
            return
        for spec in meta.stores:
            n = len(spec.keys)
            nbytes = n * self.layout.block_bytes
            if not self.loads_enabled:     # a producer flushes what each request stored
                self._producer_keys.setdefault(spec.req_id, []).extend(spec.keys)
            ns = self.link.namespace()
            on_device = self._kv[0].device.type != "cpu"
            over = self._pending_store_bytes + nbytes > self.cfg["max_pending_store_bytes"] or (
                on_device and self._device_staging + nbytes > self.cfg["device_staging_bytes"])
            if ns is None or over:
                self.counters.add(store_skipped_blocks=n)
                continue
            try:
                # The copy out of the paged cache happens now, into staging on the cache's
                # device: these blocks may be reused as soon as the step ends. The put runs on
                # the SDK's I/O threads; on a GPU engine its copy is a DMA from this staging
                # into the pinned arena slots on the SDK's copy stream, ordered after this
                # stream's gather by the event ns.put records: nothing here waits for the GPU
                # or copies into pageable memory. The staging's device bytes count against
                # device_staging_bytes until the put completes (outside vLLM's own budget).
                staging = self.pages.gather(self._kv, spec.block_ids)
                fut = ns.put(spec.keys, staging, parent_key=spec.parent_key or None)
            except Exception as exc:  # noqa: BLE001
                self.link.failed(exc)
                self.counters.add(store_failed_blocks=n, fallbacks=1)
                continue
            self._pending_store_bytes += nbytes
            self._device_staging += nbytes if on_device else 0
            # Counted as each put completes, not when reaped on a later step: the last
            # request's stores would otherwise never be counted (no step follows them).
            fut.add_done_callback(lambda f, n=n: self._count_store(f, n))
            self._stores.append((fut, n))

    def _count_store(self, fut: Future, n: int) -> None:
        """(any thread: the SDK's, when the put completes) Count one put's outcome."""
        if fut.cancelled() or fut.exception() is not None:
            self.counters.add(store_failed_blocks=n, fallbacks=1)
        else:
            self.counters.add(stored_blocks=fut.result(),
                              stored_bytes=fut.result() * self.layout.block_bytes,
                              store_present_blocks=n - fut.result())

    def _reap_stores(self) -> None:
        """(engine thread) Give back finished puts' share of max_pending_store_bytes and
        report their failures to the link (counting is _count_store's)."""
        keep = []
        for fut, n in self._stores:
            if not fut.done():
                keep.append((fut, n))
                continue
            self._pending_store_bytes -= n * self.layout.block_bytes
            if self._kv[0].device.type != "cpu":
                self._device_staging -= n * self.layout.block_bytes
            if not fut.cancelled() and fut.exception() is not None:
                self.link.failed(fut.exception())
        self._stores = keep

    @engine_time("finish_us")
    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        self._finish_sync_loads()          # wait_for_save may be deferred (speculative decoding)
        for read in self._unreported:      # this step's forward is over (see _scatter_local)
            read.report()
        self._unreported = []
        self._reap_stores()
        sent = self._finished_sending(finished_req_ids) if not self.loads_enabled else set()
        done: set[str] = set()
        keep = []
        now = time.monotonic()
        for ld in self._loads:
            if not ld.future.done() and now < ld.deadline:
                keep.append(ld)
                continue
            done.add(ld.spec.req_id)
            self._finish_load(ld)
            self._device_staging -= ld.device_bytes
        self._loads = keep
        return (sent or None), (done or None)

    def _finished_sending(self, finished_req_ids: set[str]) -> set[str]:
        """(kv_producer) Start the flush of each newly finished request that stored blocks
        (the scheduler delayed exactly those: request_finished); answer those whose blocks
        are readable from the cluster tier now, or whose flush failed or timed out (counted:
        remote_flush_timeouts; the consumer may then recompute)."""
        timeout_s = self.cfg["remote_flush_timeout_s"]
        for req_id in finished_req_ids:
            keys = self._producer_keys.pop(req_id, None)
            if keys is None:
                continue
            ns = self.link.namespace()
            fut = None
            if ns is not None:
                try:
                    fut = ns.flush_remote(keys, deadline_s=timeout_s)
                except Exception as exc:  # noqa: BLE001 - reported as a timed-out flush
                    self.link.failed(exc)
            self._flushes[req_id] = _Flush(fut, time.monotonic() + timeout_s + 5.0, len(keys))
        sent: set[str] = set()
        now = time.monotonic()
        for req_id, fl in list(self._flushes.items()):
            if fl.future is not None and not fl.future.done() and now < fl.deadline:
                continue
            del self._flushes[req_id]
            sent.add(req_id)
            placed = 0
            if fl.future is not None and fl.future.done() and fl.future.exception() is None:
                placed = fl.future.result().num_placed
            elif fl.future is not None and fl.future.done() and getattr(
                    fl.future.exception(), "reason", None) == Reason.NOT_ENABLED:
                continue          # no cluster tier: nothing to wait for, nothing missed
            self.counters.add(remote_placed_blocks=placed)
            if placed < fl.blocks:
                self.counters.add(remote_flush_timeouts=1)
        return sent

    def _finish_load(self, ld: _Load) -> None:
        ids = ld.spec.block_ids
        found = 0
        if not ld.future.done():
            ld.future.cancel()
            self.link.failed(TimeoutError(f"load not done in {self.cfg['load_timeout_s']}s"))
        elif ld.future.exception() is not None:
            self.link.failed(ld.future.exception())
        else:
            try:
                kv = ld.future.result()
                found = int(kv.shape[0])
                if found:
                    self.pages.scatter(self._kv, ids[:found], kv)
            except Exception as exc:  # noqa: BLE001
                log.warning("KVStoreConnector: writing loaded blocks failed: %s", exc)
                found = 0
        self._account_load(ids, found)

    def _account_load(self, ids: list[int], found: int) -> None:
        """Blocks [found, ...) of a load failed: vLLM recomputes them (load errors)."""
        if found < len(ids):
            self._load_errors.update(ids[found:])
            self.counters.add(load_failed_blocks=len(ids) - found, fallbacks=1)
            self.link.fallback(len(ids) - found)
        self.counters.add(loaded_blocks=found, loaded_bytes=found * self.layout.block_bytes)

    def get_block_ids_with_load_errors(self) -> set[int]:
        self._finish_sync_loads()
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self):
        if self._role == KVConnectorRole.WORKER:
            for fut, _ in self._stores:  # let issued puts land, within the I/O deadline
                try:
                    fut.result(timeout=self.cfg["io_timeout_s"])
                except Exception:  # noqa: BLE001
                    pass
            self._reap_stores()
            self._finish_sync_loads()
            self._loader.close()
        self.link.close()

    # =========================================================================================
    # Statistics
    # =========================================================================================
    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        return self.counters.take()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return KVStoreConnectorStats(data=dict(data or {}))


def _layout_from(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig",
                 role: KVConnectorRole) -> tuple[list[str], KVLayout]:
    """The kvstore layout of this engine's KV cache; ValueError for what we cannot store."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(f"KVStoreConnector supports models with one KV cache group (plain full "
                         f"attention); this one has {len(groups)}")
    spec = groups[0].kv_cache_spec
    if type(spec) is not FullAttentionSpec or spec.sliding_window or spec.attention_chunk_size:
        raise ValueError(f"KVStoreConnector supports full-attention KV caches only, got {spec}")
    if spec.head_size_v != spec.head_size or spec.num_head_slots or spec.state_content_bytes:
        raise ValueError(f"KVStoreConnector: unsupported KV page (K/V head sizes "
                         f"{spec.head_size}/{spec.head_size_v}, packed content)")
    if vllm_config.cache_config.cache_dtype not in ("auto", None):
        raise ValueError(f"KVStoreConnector: kv cache dtype {vllm_config.cache_config.cache_dtype}"
                         " (quantized KV with scales) is not supported")
    if spec.block_size != vllm_config.cache_config.block_size:
        raise ValueError(f"KVStoreConnector: KV spec block size {spec.block_size} != "
                         f"cache_config.block_size {vllm_config.cache_config.block_size}")
    tp_size = vllm_config.parallel_config.tensor_parallel_size
    tp_rank = 0
    if role == KVConnectorRole.WORKER and tp_size > 1:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
        tp_rank = get_tensor_model_parallel_rank()
    layout = KVLayout(num_layers=len(groups[0].layer_names), num_kv_heads=spec.num_kv_heads,
                      head_dim=spec.head_size, block_tokens=spec.block_size,
                      dtype=str(spec.dtype).removeprefix("torch."), tp_rank=tp_rank,
                      tp_size=tp_size)
    return list(groups[0].layer_names), layout
