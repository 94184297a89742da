"""Triton kernels for ``lowbit::affine_linear``: read the packed codes, never the dequantized matrix.

Layout read (see :mod:`lowbit.runtime.formats`): ``qweight`` rows are low-bits-first bit streams, code
``k`` of row ``n`` at bit ``k*bits`` (:func:`~.triton_common.codes`: one byte load for 1/2/4/8 bits, two for
3/5/6/7 where a code may cross a byte). ``zeros`` are packed the same way per row of groups; symmetric
weights use the midpoint ``(2**bits-1)/2``. The GEMV / GEMM kernels and their fused epilogue are described
in :mod:`.triton_common`; both match the eager reference (:func:`lowbit.runtime.formats.dequantize_affine`
then a matmul) within float32 summation order, and tests run them under ``TRITON_INTERPRET=1`` on CPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import (GEMM_CONFIGS, GEMM_KEY, GEMV_CONFIGS, GEMV_KEY, codes, dot_step, finish, gemv_step,
                            x_tile)


@triton.jit
def _dequant_tile(qw_ptr, s_ptr, z_ptr, offs_n, offs_k, N, K, G, row_bytes, zrow_bytes,
                  BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr):
    """``W[offs_n, offs_k]`` as float32 ``(BLOCK_N, BLOCK_K)`` (0 outside the matrix)."""
    q = codes(qw_ptr, offs_n, offs_k, row_bytes, N, K, BITS).to(tl.float32)
    g = offs_k // GROUP
    okg = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    s = tl.load(s_ptr + offs_n[:, None] * G + g[None, :], mask=okg, other=0.0).to(tl.float32)
    if SYM:
        z = ((1 << BITS) - 1) / 2.0
    else:
        z = codes(z_ptr, offs_n, g, zrow_bytes, N, G, BITS).to(tl.float32)
    return tl.where(okg, (q - z) * s, 0.0)


@triton.autotune(configs=GEMV_CONFIGS, key=GEMV_KEY)
@triton.jit
def affine_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, t_ptr, lb_ptr, bias_ptr, M, N, K, R, k_per_split,
                       G, row_bytes, zrow_bytes,
                       BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr,
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
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, offs_n, offs_k, N, K, G, row_bytes, zrow_bytes, BITS, GROUP, SYM)
        acc = gemv_step(acc, w, x_ptr, offs_k, kmask, M, K, M_ROWS)
    finish(acc, tl.arange(0, M_ROWS), offs_n, out_ptr + pid_k * M * N, t_ptr, lb_ptr, bias_ptr, M, N, R,
           HAS_THIN, HAS_BIAS)


@triton.autotune(configs=GEMM_CONFIGS, key=GEMM_KEY)
@triton.jit
def affine_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, t_ptr, lb_ptr, bias_ptr, M, N, K, R, M_BUCKET,
                       G, row_bytes, zrow_bytes,
                       BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr,
                       HAS_THIN: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, offs_n, offs_k, N, K, G, row_bytes, zrow_bytes, BITS, GROUP, SYM)
        acc = dot_step(acc, x_tile(x_ptr, offs_m, offs_k, M, K), w, DOT)
    finish(acc, offs_m, offs_n, out_ptr, t_ptr, lb_ptr, bias_ptr, M, N, R, HAS_THIN, HAS_BIAS)
