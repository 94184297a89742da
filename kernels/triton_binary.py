"""Triton kernels for ``lowbit::binary_linear`` (BiLLM :class:`~lowbit.runtime.formats.BinaryResidual`).

Reads the 1-bit planes directly. Per column the host precomputes (once per weight, cached) its kind
(0 = non-salient, 1 = salient, 2 = fp16 outlier) and its position in the salient order (for the residual
sign plane) and in the non-salient order (for the group bitmap). A weight is then
``alpha[part]*s (+ mu[part])``, or ``alpha0*s + alpha1*r (+ mu0 + mu1)`` for salient columns; outlier
columns contribute 0 here and are added by the wrapper as ``x[:, cols] @ vals.T`` (a few columns).
Same GEMV / GEMM split as :mod:`lowbit.kernels.triton_affine`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_affine import _codes


@triton.jit
def _binary_tile(signs_ptr, res_ptr, group_ptr, a_ptr, mu_ptr, kind_ptr, spos_ptr, npos_ptr, offs_n, offs_k,
                 N, K, S, NB, sign_bytes, res_bytes, group_bytes, BLOCK: tl.constexpr, HAS_MU: tl.constexpr):
    ok = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    kmask = offs_k < K
    kind = tl.load(kind_ptr + offs_k, mask=kmask, other=2).to(tl.int32)
    spos = tl.load(spos_ptr + offs_k, mask=kmask, other=0)
    npos = tl.load(npos_ptr + offs_k, mask=kmask, other=0)
    s = _codes(signs_ptr, offs_n, offs_k, sign_bytes, N, K, 1).to(tl.float32) * 2.0 - 1.0
    r = _codes(res_ptr, offs_n, spos, res_bytes, N, S, 1).to(tl.float32) * 2.0 - 1.0
    g = _codes(group_ptr, offs_n, npos, group_bytes, N, K - S, 1)
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


@triton.jit
def binary_gemv_kernel(x_ptr, signs_ptr, res_ptr, group_ptr, a_ptr, mu_ptr, kind_ptr, spos_ptr, npos_ptr, out_ptr,
                       M, N, K, S, NB, sign_bytes, res_bytes, group_bytes, k_per_split,
                       BLOCK: tl.constexpr, HAS_MU: tl.constexpr, M_ROWS: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo = pid_k * k_per_split
    for m in range(M_ROWS):
        if m < M:
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for k0 in range(k_lo, k_lo + k_per_split, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                kmask = (offs_k < K) & (offs_k < k_lo + k_per_split)
                xv = tl.load(x_ptr + m * K + offs_k, mask=kmask, other=0.0).to(tl.float32)
                w = _binary_tile(signs_ptr, res_ptr, group_ptr, a_ptr, mu_ptr, kind_ptr, spos_ptr, npos_ptr, offs_n,
                                 offs_k, N, K, S, NB, sign_bytes, res_bytes, group_bytes, BLOCK, HAS_MU)
                acc += tl.sum(w * xv[None, :], axis=1)
            tl.store(out_ptr + (pid_k * M + m) * N + offs_n, acc, mask=offs_n < N)


@triton.jit
def binary_gemm_kernel(x_ptr, signs_ptr, res_ptr, group_ptr, a_ptr, mu_ptr, kind_ptr, spos_ptr, npos_ptr, out_ptr,
                       M, N, K, S, NB, sign_bytes, res_bytes, group_bytes,
                       BLOCK: tl.constexpr, HAS_MU: tl.constexpr, HALF: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xm = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        xt = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=xm, other=0.0)
        w = _binary_tile(signs_ptr, res_ptr, group_ptr, a_ptr, mu_ptr, kind_ptr, spos_ptr, npos_ptr, offs_n, offs_k,
                         N, K, S, NB, sign_bytes, res_bytes, group_bytes, BLOCK, HAS_MU)
        if HALF:
            acc += tl.dot(xt.to(tl.float16), tl.trans(w.to(tl.float16)), out_dtype=tl.float32)
        else:
            acc += tl.dot(xt.to(tl.float32), tl.trans(w), out_dtype=tl.float32, input_precision="ieee")
    om = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=om)
