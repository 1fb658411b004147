"""Test-only patches for running SGLang's server on CPU (tests/sglang_shims/README.md).

On PYTHONPATH only for the server smoke test, so every process the server spawns runs this at
start-up. It patches SGLang modules right after they are first imported (nothing is imported
early, nothing else is touched):
- ``pool_host.base.HostKVCache``: host pools are always built pinned, and pinning needs CUDA
  (``Torch not compiled with CUDA enabled`` on the CPU torch); force ``pin_memory=False``.
- ``pool_host.base.HICACHE_HOST_MEMORY_RESERVE_BYTES``: SGLang keeps 10 GiB of host RAM out of
  the host pool's budget, more than a small shared test box has free; reserve 256 MiB.
- ``pool_host.mha``: imports its device<->host copy ops only on CUDA/HIP (sgl_kernel) and XPU;
  on CPU ``transfer_kv_direct`` (the op of ``--hicache-io-backend direct`` with the
  ``layer_first`` host layout) is undefined and the first backup fails with ``NameError``.
  Bind a plain-torch one.
"""
import importlib.abc
import importlib.machinery
import sys


def _patch_base(mod) -> None:
    mod.HICACHE_HOST_MEMORY_RESERVE_BYTES = 256 * 1024 * 1024
    init = mod.HostKVCache.__init__

    def unpinned_init(self, *args, **kwargs):
        kwargs["pin_memory"] = False
        init(self, *args, **kwargs)
    mod.HostKVCache.__init__ = unpinned_init


def transfer_kv_direct(src_layers, dst_layers, src_indices, dst_indices, page_size) -> None:
    """Token rows ``src_indices`` of each source layer buffer into rows ``dst_indices`` of the
    matching destination buffer (what sgl_kernel's op does, page by page)."""
    for src, dst in zip(src_layers, dst_layers):
        dst[dst_indices.to(dst.device)] = src[src_indices.to(src.device)].to(dst.device)


def _patch_mha(mod) -> None:
    if not hasattr(mod, "transfer_kv_direct"):
        mod.transfer_kv_direct = transfer_kv_direct


_PATCHES = {"sglang.srt.mem_cache.pool_host.base": _patch_base,
            "sglang.srt.mem_cache.pool_host.mha": _patch_mha}


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _PATCHES[module.__name__](module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None:
            spec.loader = _Loader(spec.loader)
        return spec


sys.meta_path.insert(0, _Finder())
