"""Test-only stand-in for sgl_kernel (tests/sglang_shims/README.md): the two ops SGLang's CPU
engine imports at load time (``sglang.srt.mem_cache.allocation``,
``sglang.kernels.ops.kvcache.cache_move``), in plain torch. The real package is a CUDA/CPU-AMX
build that pip cannot install beside the CPU torch. Every other name (ops the CPU engine
imports but a tiny Llama with torch_native attention never calls, e.g. speculative decoding's)
imports as a function that raises when called, so a path that does need one fails loudly."""
import ctypes


def copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt_loc, src_loc) -> None:
    """Within each buffer ``data_ptrs[b]`` (rows of ``strides[b]`` bytes), copy row
    ``src_loc[i]`` to row ``tgt_loc[i]`` for every i; every source row is read before any
    target row is written, as the CUDA kernel does, so overlapping moves are safe."""
    src = [int(x) for x in src_loc.tolist()]
    tgt = [int(x) for x in tgt_loc.tolist()]
    for base, stride in zip(data_ptrs.tolist(), strides.tolist()):
        rows = [ctypes.string_at(base + s * stride, stride) for s in src]
        for t, row in zip(tgt, rows):
            ctypes.memmove(base + t * stride, row, stride)


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset,
                                 out_cache_loc, pool_len) -> None:
    """For request i: ``req_to_token[req_pool_indices[i], start[i]:end[i]]`` = the next
    ``end[i] - start[i]`` entries of ``out_cache_loc`` (requests in order), as the Triton
    kernel ``allocation.assign_req_to_token_pool`` does."""
    pos = 0
    for r, s, e in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        req_to_token[r, s:e] = out_cache_loc[pos:pos + e - s]
        pos += e - s


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def unavailable(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name} is not in the test stand-in "
                                  "(tests/sglang_shims/server/sgl_kernel)")
    unavailable.__name__ = name
    return unavailable
