"""A vLLM KV connector backed by the kvstore daemon (vLLM v1 ``KVConnectorBase_V1``).

Switch it on with::

    vllm serve MODEL --kv-transfer-config '{"kv_connector":"KVStoreConnector",
        "kv_connector_module_path":"kvstore.client.vllm","kv_role":"kv_both",
        "kv_connector_extra_config":{"socket":"/run/kvstore/kv.sock"}}'

kv_role: kv_both loads and stores; kv_producer (a prefill engine) only stores, kv_consumer (a
decode engine) only loads — with both daemons on one cluster tier (--remote), KV a prefill
host computed reaches the decode host through it.

Protocol, in vLLM's call order:
  scheduler  get_num_new_matched_tokens  Lookup of the prompt's key chain. A hit all in this
                                          host's DRAM, up to sync_load_max_bytes, loads
                                          synchronously: in the step that schedules the request,
                                          before its forward. Any other hit (SSD, cluster tier,
                                          another host, bigger) loads asynchronously (the request
                                          waits in WAITING_FOR_REMOTE_KVS, the engine keeps
                                          stepping). See docs/integrations/vllm.md, "Load modes".
             update_state_after_alloc    records which vLLM blocks receive the hit.
             build_connector_meta        per step: the loads to start, and the blocks this
                                          step completes, to store (prompt blocks, and with
                                          store_generated those of generated tokens).
             request_finished            forgets the request; never holds its blocks (the
                                          store was issued when the blocks were computed).
  worker     register_kv_caches          checks the engine's KV page format (refuses unknown).
             start_load_kv               synchronous loads: scatter straight from the arena's
                                          slots into the paged cache (Namespace.read_local); on
                                          a CPU engine layer by layer on the loader thread
                                          (kvstore.client.layerwise) while the forward runs,
                                          otherwise whole, here; the asynchronous ones: SDK gets
                                          into staging on the KV cache's device (I/O threads).
             wait_for_layer_load         waits for one layer of this step's synchronous loads.
             wait_for_save               end of the forward: waits for the loader, checks the
                                          synchronous loads' slot-generation proofs; copies the
                                          completed blocks out of the paged cache and hands them
                                          to an SDK put (async).
             get_finished                copies finished gets into the paged cache and reports
                                          the request done.
             get_block_ids_with_load_errors  blocks missing or failed in either mode: vLLM
                                          recomputes them (a sync load's step then stores
                                          nothing: its forward read them).
  save_kv_layer is a no-op: a store is taken after the whole forward.

Blocks: kvstore's block_tokens is vLLM's block_size, so one vLLM block is one kvstore block
and keys chain over the prompt's token ids (only full blocks; the tail of a prompt that ends
mid-block is recomputed). Bytes are kvstore's canonical layout [layers, 2, block, heads,
head_dim], converted from the backend's page format by kvstore.kernels (pages.py: the
backend's page as a strided view; gather/scatter: Triton on CUDA, the torch reference
elsewhere), so any runtime declaring the same layout reads them. Staging lives on the KV
cache's device, bounded by device_staging_bytes on a GPU: there a store is one DMA per run
from it into the pinned arena, on the SDK's copy stream. Failure rule: every daemon error, timeout or restart is a miss (counted as a
fallback) and vLLM recomputes; nothing here raises into the engine.

Modules: connector.py (the KVConnectorBase_V1 implementation), stats.py (its counters); the
layer-wise loader is client/layerwise.py; the
daemon link, backoff and fallback reports are client/link.py, shared with the other adapters.
"""
from kvstore.client.vllm.connector import (KVStoreConnector, KVStoreConnectorMetadata, LoadSpec,
                                           StoreSpec)
from kvstore.client.vllm.stats import KVStoreConnectorStats

__all__ = ["KVStoreConnector", "KVStoreConnectorMetadata", "KVStoreConnectorStats", "LoadSpec",
           "StoreSpec"]
