"""Prefix-cache reuse for Hugging Face transformers causal LMs.

    from kvstore.client.hf import HFPrefixCache
    kv = HFPrefixCache(model, model_id="my-llama@v1")      # connects to the default daemon
    out = kv.generate(input_ids, max_new_tokens=64)        # same kwargs as model.generate

Per request (``generate`` with a batch of one prompt):

1. the prompt's full blocks are keyed (prefix hash chain) and the longest stored prefix is
   leased from the daemon in one call (``Namespace.acquire``);
2. the leased blocks are copied out of the shared arena layer by layer on a background thread
   while the model already computes: layer ``i`` waits only for its own KV;
3. only the uncached suffix is computed — at least the last prompt token always is, since its
   logits are needed, so a prompt ending on a block boundary reuses all but its last block;
4. once the first token is sampled, the prompt's new full blocks are packed and stored on a
   background thread (``Namespace.put``): the store never delays the first token.

A client that cannot map the daemon's arena (a remote daemon) fetches the prefix with
``Namespace.get`` instead, before compute starts. Beam search and several samples per prompt
share the one cached prefix.

The cache never makes inference fail: daemon down, restarted, slow (past ``deadline_s``) or
answering an error, a stale lease, a refused layout discovered late — each degrades to a full
recompute, counted in :attr:`HFPrefixCache.stats` and logged; the next request tries the daemon
again (the SDK reconnects on its own). Only a model the cache cannot represent, or a layout the
daemon refuses at construction, raises (:class:`LayoutMismatch`, ValueError).

Exactness: reused KV is the bytes an earlier prefill of the same model produced, so greedy
tokens equal a full recompute's; logits are equal up to the float reassociation that a
different query length brings to matmul/attention kernels (see tests/client/test_hf_exact.py).

Modules: prefix_cache.py (HFPrefixCache, layout_for), cache.py (the layer-wise loader, the
DynamicCache that waits for it, pack_blocks); partial recomputation is client/hybrid.py.
"""
from kvstore.client.hf.prefix_cache import (HFPrefixCache, LayoutMismatch, RequestReport,
                                            layout_for, weights_digest)

__all__ = ["HFPrefixCache", "LayoutMismatch", "RequestReport", "layout_for", "weights_digest"]
