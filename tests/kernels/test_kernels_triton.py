"""The Triton kernels against the torch reference.

Without a GPU the kernels still run through triton's interpreter (TRITON_INTERPRET=1, CPU
tensors), which checks their indexing, masking and quantization arithmetic; the GPU tests
(marked ``gpu``, skipped without CUDA) check the compiled kernels on a real device.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvstore.kernels import QMAX, gather, gather_quantized, scatter, scatter_dequantized
try:                                   # tests/ as rootdir-relative modules (the default)
    from test_kernels import layers_of, make_cache
except ImportError:                    # tests/ as a package
    from tests.test_kernels import layers_of, make_cache

TESTS = Path(__file__).resolve().parent

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()

requires_cuda = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON),
                                   reason="needs a CUDA device and triton")

# The interpreter must be switched on before triton decorates the kernels, and a process that
# already imported them compiled for a GPU cannot be switched back: run it in a fresh process.
_INTERPRET_CHECK = r"""
import os, torch
from test_kernels import make_cache, layers_of
from kvstore.kernels import gather, scatter, gather_quantized, scatter_dequantized
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for kind in ("per_layer", "layer_first", "hnd"):
        for P, ppb in ((4, 2), (2, 3)):
            cache = make_cache(kind, 3, 9, P, 2, 8, dtype)
            pt = torch.tensor([[3, 1, 4][:ppb], [0, 7, 8][:ppb]])
            a = gather(cache, pt, impl="torch")
            assert torch.equal(a, gather(cache, pt, impl="triton")), (dtype, kind, P)
            c1 = make_cache(kind, 3, 9, P, 2, 8, dtype, seed=1)
            c2 = make_cache(kind, 3, 9, P, 2, 8, dtype, seed=1)
            scatter(c1, pt, a + 1, impl="torch")
            scatter(c2, pt, a + 1, impl="triton")
            assert all(torch.equal(x, y) for x, y in zip(layers_of(c1), layers_of(c2)))
            for name in ("int8", "float8_e4m3fn") if P == 4 else ():     # keep it short
                qa = gather_quantized(cache, pt, name, impl="torch")
                qb = gather_quantized(cache, pt, name, impl="triton")
                assert torch.equal(qa.scales, qb.scales), (dtype, kind, name)
                # triton 3.6's interpreter rounds float->fp8 without carrying a mantissa overflow
                # into the exponent (126.1 -> 64), so fp8 payloads are compared on GPU only; and
                # it truncates float32->bfloat16 where GPUs (and torch) round to nearest even,
                # so dequantized bf16 may differ by one ulp here (the GPU tests want equality).
                if name == "int8":
                    assert torch.equal(qa.data, qb.data), (dtype, kind)
                scatter_dequantized(c1, pt, qa, impl="torch")
                scatter_dequantized(c2, pt, qa, impl="triton")
                tol = 2.0 ** -7 if dtype == torch.bfloat16 else 0.0
                assert all(torch.allclose(x.float(), y.float(), rtol=tol, atol=0)
                           for x, y in zip(layers_of(c1), layers_of(c2))), (dtype, kind, name)
# pages larger than one 1024-element tile, and a ragged last tile (P*H*D = 3*5*70 = 1050)
for kind in ("per_layer", "layer_first", "hnd"):
    for P, H, D in ((16, 2, 64), (3, 5, 70)):
        cache = make_cache(kind, 2, 5, P, H, D, torch.bfloat16)
        pt = torch.tensor([[4, 0], [2, 3]])
        a = gather(cache, pt, impl="torch")
        assert torch.equal(a, gather(cache, pt, impl="triton")), (kind, P, H, D)
        c1 = make_cache(kind, 2, 5, P, H, D, torch.bfloat16, seed=1)
        c2 = make_cache(kind, 2, 5, P, H, D, torch.bfloat16, seed=1)
        scatter(c1, pt, a, impl="torch")
        scatter(c2, pt, a, impl="triton")
        assert all(torch.equal(x, y) for x, y in zip(layers_of(c1), layers_of(c2)))
        qa = gather_quantized(cache, pt, "int8", impl="torch")
        qb = gather_quantized(cache, pt, "int8", impl="triton")
        assert torch.equal(qa.scales, qb.scales) and torch.equal(qa.data, qb.data), (kind, P)
        scatter_dequantized(c1, pt, qa, impl="torch")
        scatter_dequantized(c2, pt, qa, impl="triton")
        assert all(torch.allclose(x.float(), y.float(), rtol=2.0 ** -7, atol=0)
                   for x, y in zip(layers_of(c1), layers_of(c2))), (kind, P)
print("interpreter ok")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernels_match_reference_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(TESTS)}
    r = subprocess.run([sys.executable, "-c", _INTERPRET_CHECK], cwd=TESTS, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "interpreter ok" in r.stdout, r.stdout + r.stderr


# -- on a GPU ---------------------------------------------------------------------------------
def _cuda_cache(kind, L, N, P, H, D, dtype, seed=0, misalign=False):
    cache = make_cache(kind, L, N, P, H, D, dtype, seed)
    if isinstance(cache, list):
        if misalign:     # storage one element off 16-byte alignment: the unvectorized path
            out = []
            for t in cache:
                buf = torch.empty(t.numel() + 1, dtype=dtype, device="cuda")[1:]
                out.append(buf.view(t.shape).copy_(t))
            return out
        return [t.cuda() for t in cache]
    return cache.cuda() if kind == "layer_first" else cache.transpose(3, 4).cuda().transpose(3, 4)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["per_layer", "layer_first", "hnd", "misaligned"])
@pytest.mark.parametrize("P, ppb", [(16, 1), (4, 4), (16, 2)])
def test_gpu_gather_scatter_match_reference(dtype, kind, P, ppb):
    misalign = kind == "misaligned"
    cache = _cuda_cache("per_layer" if misalign else kind, 4, 96, P, 8, 128, dtype,
                        misalign=misalign)
    n = 96 // ppb // 2
    pt = torch.randperm(96)[: n * ppb].reshape(n, ppb)
    want = gather(cache, pt, impl="torch")
    got = gather(cache, pt)               # auto: triton on CUDA
    assert torch.equal(got, want)
    dst = torch.randperm(96)[: n * ppb].reshape(n, ppb)
    ref = _cuda_cache("per_layer" if misalign else kind, 4, 96, P, 8, 128, dtype, seed=1,
                      misalign=misalign)
    tri = _cuda_cache("per_layer" if misalign else kind, 4, 96, P, 8, 128, dtype, seed=1,
                      misalign=misalign)
    scatter(ref, dst, want, impl="torch")
    scatter(tri, dst, want)
    assert all(torch.equal(a, b) for a, b in zip(layers_of(ref), layers_of(tri)))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("name", sorted(QMAX))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["per_layer", "layer_first"])
def test_gpu_quantized_offload_matches_reference(name, dtype, kind):
    if name != "int8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 conversion needs compute capability 8.9+")
    cache = _cuda_cache(kind, 4, 64, 16, 8, 128, dtype)
    pt = torch.randperm(64)[:32].reshape(16, 2)
    qa = gather_quantized(cache, pt, name, impl="torch")
    qb = gather_quantized(cache, pt, name)
    assert torch.equal(qa.scales, qb.scales)
    assert torch.equal(qa.data.view(torch.uint8), qb.data.view(torch.uint8))
    ref = _cuda_cache(kind, 4, 64, 16, 8, 128, dtype, seed=1)
    tri = _cuda_cache(kind, 4, 64, 16, 8, 128, dtype, seed=1)
    scatter_dequantized(ref, pt, qa, impl="torch")
    scatter_dequantized(tri, pt, qa)
    assert all(torch.equal(a, b) for a, b in zip(layers_of(ref), layers_of(tri)))


# -- compiled for a GPU, without one ----------------------------------------------------------
def _compile_for_sm90(fn, types: dict, consts: dict, arch: int = 90):
    """triton.compile for an H100 (sm_90) target: needs no driver, only triton's bundled tools.

    Pointer arguments get the 16-byte divisibility the JIT gives every aligned tensor at launch.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig = {a: ("constexpr" if a in consts else types[a]) for a in fn.arg_names}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]]
             for a, t in types.items() if t.startswith("*")}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32)).asm["ptx"]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernels_compile_for_sm90_with_vector_copies_and_rounding_conversions():
    import re
    from kvstore.kernels import triton_kv as K
    common = {"layer_off": "*i64", "page_table": "*i64", "s_kv": "i64", "s_page": "i64",
              "s_tok": "i32", "s_head": "i32"}
    shape = {"L": 4, "PPB": 2, "P": 16, "H": 8, "D": 128, "TILE": 1024, "DENSE": True, "ALIGN": 8}
    ptx = _compile_for_sm90(K._copy_pages, {**common, "cache": "*bf16", "blocks": "*bf16"},
                            {**shape, "TO_CACHE": False})
    # 16-byte vector loads and stores: the alignment hints reach the code generator
    assert "ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx
    ptx = _compile_for_sm90(K._gather_quant, {**common, "cache": "*bf16", "q": "*fp8e4nv",
                                              "scales": "*fp32"},
                            {**shape, "QMAX_": 448.0, "INT8": False})
    assert "div.rn.f32" in ptx                                    # the reference's true division
    assert re.search(r"cvt\.rn(\.satfinite)?\.e4m3x2\.f32", ptx)  # round to nearest even, as torch
    ptx = _compile_for_sm90(K._dequant_scatter, {**common, "cache": "*fp16", "q": "*i8",
                                                 "scales": "*fp32"}, {**shape, "DENSE": False,
                                                                      "ALIGN": 1})
    assert "st.global" in ptx


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("arch", [80, 90])
def test_every_kernel_variant_compiles(arch):
    from kvstore.kernels import triton_kv as K
    common = {"layer_off": "*i64", "page_table": "*i64", "s_kv": "i64", "s_page": "i64",
              "s_tok": "i32", "s_head": "i32"}
    for dt in ("bf16", "fp16", "fp32"):
        for dense, align in ((True, 16 // {"bf16": 2, "fp16": 2, "fp32": 4}[dt]), (False, 1)):
            shape = {"L": 3, "PPB": 4, "P": 4, "H": 2, "D": 64, "TILE": 1024, "DENSE": dense,
                     "ALIGN": align}
            for to_cache in (False, True):
                _compile_for_sm90(K._copy_pages, {**common, "cache": f"*{dt}", "blocks": f"*{dt}"},
                                  {**shape, "TO_CACHE": to_cache}, arch)
            # fp8 e4m3 needs sm_89+: the launcher refuses it below that
            for q, qmax in (("*i8", 127.0), ("*fp8e4nv", 448.0)) if arch >= 89 else (("*i8", 127.0),):
                types = {**common, "cache": f"*{dt}", "q": q, "scales": "*fp32"}
                _compile_for_sm90(K._gather_quant, types,
                                  {**shape, "QMAX_": qmax, "INT8": q == "*i8"}, arch)
                _compile_for_sm90(K._dequant_scatter, types, shape, arch)
