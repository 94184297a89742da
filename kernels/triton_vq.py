"""Triton kernels for ``lowbit::vq_linear`` (ReALLM's :class:`~lowbit.runtime.formats.VQCodebook`).

The weight is never materialized: a tile ``W[offs_n, offs_k]`` (stored column order) is decoded in
registers from the packed indices (one index per ``VEC`` columns, read like an affine code: a byte load or
two, a shift and a mask), a gather from the codebook (``2**IBITS x VEC`` fp16, a few KiB that stay in cache) and
the group scale. The column permutation is applied to the activations instead (``x[:, perm]``, M x K,
negligible next to the weight), so the kernels see a plain row-major product. Same GEMV / GEMM kernels and
fused epilogue (low-rank branch, bias) as :mod:`.triton_affine` (see :mod:`.triton_common`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import (GEMM_CONFIGS, GEMM_KEY, GEMV_CONFIGS, GEMV_KEY, codes, dot_step, finish, gemv_step,
                            x_tile)


@triton.jit
def _vq_tile(idx_ptr, book_ptr, s_ptr, offs_n, offs_k, N, K, G, row_bytes,
             IBITS: tl.constexpr, VEC: tl.constexpr, GROUP: tl.constexpr):
    """``Wp[offs_n, offs_k]`` (stored order) as float32 ``(BLOCK_N, BLOCK_K)`` (0 outside the matrix)."""
    vec = offs_k // VEC
    code = codes(idx_ptr, offs_n, vec, row_bytes, N, K // VEC, IBITS)
    ok = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    val = tl.load(book_ptr + code * VEC + (offs_k % VEC)[None, :], mask=ok, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + offs_n[:, None] * G + (offs_k // GROUP)[None, :], mask=ok, other=0.0).to(tl.float32)
    return tl.where(ok, val * s, 0.0)


@triton.autotune(configs=GEMV_CONFIGS, key=GEMV_KEY)
@triton.jit
def vq_gemv_kernel(x_ptr, idx_ptr, book_ptr, s_ptr, out_ptr, t_ptr, lb_ptr, bias_ptr, M, N, K, R, k_per_split,
                   G, row_bytes, IBITS: tl.constexpr, VEC: tl.constexpr, GROUP: tl.constexpr,
                   HAS_THIN: tl.constexpr, HAS_BIAS: tl.constexpr, M_ROWS: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo = pid_k * k_per_split
    acc = tl.zeros((M_ROWS, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_lo + k_per_split, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = (offs_k < K) & (offs_k < k_lo + k_per_split)
        w = _vq_tile(idx_ptr, book_ptr, s_ptr, offs_n, offs_k, N, K, G, row_bytes, IBITS, VEC, GROUP)
        acc = gemv_step(acc, w, x_ptr, offs_k, kmask, M, K, M_ROWS)
    finish(acc, tl.arange(0, M_ROWS), offs_n, out_ptr + pid_k * M * N, t_ptr, lb_ptr, bias_ptr, M, N, R,
           HAS_THIN, HAS_BIAS)


@triton.autotune(configs=GEMM_CONFIGS, key=GEMM_KEY)
@triton.jit
def vq_gemm_kernel(x_ptr, idx_ptr, book_ptr, s_ptr, out_ptr, t_ptr, lb_ptr, bias_ptr, M, N, K, R, M_BUCKET,
                   G, row_bytes, IBITS: tl.constexpr, VEC: tl.constexpr, GROUP: tl.constexpr,
                   HAS_THIN: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = _vq_tile(idx_ptr, book_ptr, s_ptr, offs_n, offs_k, N, K, G, row_bytes, IBITS, VEC, GROUP)
        acc = dot_step(acc, x_tile(x_ptr, offs_m, offs_k, M, K), w, DOT)
    finish(acc, offs_m, offs_n, out_ptr, t_ptr, lb_ptr, bias_ptr, M, N, R, HAS_THIN, HAS_BIAS)
