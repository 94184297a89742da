"""Triton kernels for ``lowbit::binary_linear`` (BiLLM :class:`~lowbit.runtime.formats.BinaryResidual`).

Reads the 1-bit planes directly. Per column the host precomputes (once per weight, cached) its kind
(0 = non-salient, 1 = salient, 2 = fp16 outlier) and its position in the salient order (for the residual
sign plane) and in the non-salient order (for the group bitmap). A weight is then
``alpha[part]*s (+ mu[part])``, or ``alpha0*s + alpha1*r (+ mu0 + mu1)`` for salient columns; outlier
columns contribute 0 to the tile and enter through the fused epilogue as the thin term ``x[:, cols] @ vals.T``
(:func:`~.triton_common.finish`). Same GEMV / GEMM kernels as :mod:`.triton_affine`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import (GEMM_CONFIGS, GEMM_KEY, GEMV_CONFIGS, GEMV_KEY, codes, dot_step, finish, gemv_step,
                            x_tile)


@triton.jit
def _binary_tile(signs_ptr, res_ptr, group_ptr, a_ptr, mu_ptr, kind_ptr, spos_ptr, npos_ptr, offs_n, offs_k,
                 N, K, S, NB, sign_bytes, res_bytes, group_bytes, BLOCK: tl.constexpr, HAS_MU: tl.constexpr):
    ok = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    kmask = offs_k < K
    kind = tl.load(kind_ptr + offs_k, mask=kmask, other=2).to(tl.int32)
    spos = tl.load(spos_ptr + offs_k, mask=kmask, other=0)
    npos = tl.load(npos_ptr + offs_k, mask=kmask, other=0)
    s = codes(signs_ptr, offs_n, offs_k, sign_bytes, N, K, 1).to(tl.float32) * 2.0 - 1.0
    r = codes(res_ptr, offs_n, spos, res_bytes, N, S, 1).to(tl.float32) * 2.0 - 1.0
    g = codes(group_ptr, offs_n, npos, group_bytes, N, K - S, 1)
    blk = offs_k // BLOCK
    aidx = (offs_n[:, None] * NB + blk[None, :]) * 4
    a0 = tl.load(a_ptr + aidx, mask=ok, other=0.0).to(tl.float32)
    a1 = tl.load(a_ptr + aidx + 1, mask=ok, other=0.0).to(tl.float32)
    part = 2 + g  # 2 = concentrated, 3 = sparse
    ap = tl.load(a_ptr + aidx + part, mask=ok, other=0.0).to(tl.float32)
    sal = kind[None, :] == 1
    w = tl.where(sal, a0 * s + a1 * r, ap * s)
    if HAS_MU:
        m01 = tl.load(mu_ptr + aidx, mask=ok, other=0.0).to(tl.float32) + \
            tl.load(mu_ptr + aidx + 1, mask=ok, other=0.0).to(tl.float32)
        mp = tl.load(mu_ptr + aidx + part, mask=ok, other=0.0).to(tl.float32)
        w += tl.where(sal, m01, mp)
    return tl.where(ok & (kind[None, :] != 2), w, 0.0)


@triton.autotune(configs=GEMV_CONFIGS, key=GEMV_KEY)
@triton.jit
def binary_gemv_kernel(x_ptr, signs_ptr, res_ptr, group_ptr, a_ptr, mu_ptr, kind_ptr, spos_ptr, npos_ptr, out_ptr,
                       t_ptr, lb_ptr, bias_ptr, M, N, K, R, k_per_split, S, NB, sign_bytes, res_bytes, group_bytes,
                       BLOCK: tl.constexpr, HAS_MU: tl.constexpr,
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
        w = _binary_tile(signs_ptr, res_ptr, group_ptr, a_ptr, mu_ptr, kind_ptr, spos_ptr, npos_ptr, offs_n,
                         offs_k, N, K, S, NB, sign_bytes, res_bytes, group_bytes, BLOCK, HAS_MU)
        acc = gemv_step(acc, w, x_ptr, offs_k, kmask, M, K, M_ROWS)
    finish(acc, tl.arange(0, M_ROWS), offs_n, out_ptr + pid_k * M * N, t_ptr, lb_ptr, bias_ptr, M, N, R,
           HAS_THIN, HAS_BIAS)


@triton.autotune(configs=GEMM_CONFIGS, key=GEMM_KEY)
@triton.jit
def binary_gemm_kernel(x_ptr, signs_ptr, res_ptr, group_ptr, a_ptr, mu_ptr, kind_ptr, spos_ptr, npos_ptr, out_ptr,
                       t_ptr, lb_ptr, bias_ptr, M, N, K, R, M_BUCKET, S, NB, sign_bytes, res_bytes, group_bytes,
                       BLOCK: tl.constexpr, HAS_MU: tl.constexpr,
                       HAS_THIN: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = _binary_tile(signs_ptr, res_ptr, group_ptr, a_ptr, mu_ptr, kind_ptr, spos_ptr, npos_ptr, offs_n, offs_k,
                         N, K, S, NB, sign_bytes, res_bytes, group_bytes, BLOCK, HAS_MU)
        acc = dot_step(acc, x_tile(x_ptr, offs_m, offs_k, M, K), w, DOT)
    finish(acc, offs_m, offs_n, out_ptr, t_ptr, lb_ptr, bias_ptr, M, N, R, HAS_THIN, HAS_BIAS)
