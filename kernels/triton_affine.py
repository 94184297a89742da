"""Triton kernels for ``lowbit::affine_linear``: read the packed codes, never the dequantized matrix.

Layout read (see :mod:`lowbit.runtime.formats`): ``qweight`` rows are low-bits-first bit streams, code
``k`` of row ``n`` at bit ``k*bits``; for any width 1..8 it lies in the 16-bit window of bytes
``k*bits//8`` and the next one, so one code = two byte loads, a shift and a mask (3-bit codes cross bytes).
``zeros`` are packed the same way per row of groups; symmetric weights use the midpoint ``(2**bits-1)/2``.

Two kernels, one rule (:func:`choose`):

* **GEMV** (M <= 8 rows, decode): each program owns ``BLOCK_N`` output columns and a K-slice; the rows of
  ``x`` are few, so the product is a broadcast multiply and a reduction over K (no tensor cores needed),
  and with ``SPLIT_K`` > 1 the K-slices of one column block run in parallel and their partial sums are
  added afterwards (pays when N alone gives too few programs to fill the GPU).
* **GEMM** (many rows, prefill): ``BLOCK_M x BLOCK_N`` tiles, dequantize a ``BLOCK_N x BLOCK_K`` tile in
  registers, ``tl.dot``.

Both match the eager reference (:func:`lowbit.runtime.formats.dequantize_affine` then a matmul) within
float32 summation order; tests run them under ``TRITON_INTERPRET=1`` on CPU.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _codes(ptr, rows, cols, row_bytes, n_rows, n_cols, BITS: tl.constexpr):
    """Codes at ``rows[:, None] x cols[None, :]`` of a packed uint8 matrix (0 outside)."""
    bit = cols * BITS
    byte = bit // 8
    shift = bit % 8
    base = ptr + rows[:, None] * row_bytes + byte[None, :]
    ok = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    lo = tl.load(base, mask=ok, other=0).to(tl.int32)
    ok_hi = ok & ((byte[None, :] + 1) < row_bytes)
    hi = tl.load(base + 1, mask=ok_hi, other=0).to(tl.int32)
    return ((lo | (hi << 8)) >> shift[None, :]) & ((1 << BITS) - 1)


@triton.jit
def _dequant_tile(qw_ptr, s_ptr, z_ptr, offs_n, offs_k, N, K, G, row_bytes, zrow_bytes,
                  BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr):
    """``W[offs_n, offs_k]`` as float32 ``(BLOCK_N, BLOCK_K)`` (0 outside the matrix)."""
    q = _codes(qw_ptr, offs_n, offs_k, row_bytes, N, K, BITS).to(tl.float32)
    g = offs_k // GROUP
    okg = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    s = tl.load(s_ptr + offs_n[:, None] * G + g[None, :], mask=okg, other=0.0).to(tl.float32)
    if SYM:
        z = ((1 << BITS) - 1) / 2.0
        w = (q - z) * s
    else:
        z = _codes(z_ptr, offs_n, g, zrow_bytes, N, G, BITS).to(tl.float32)
        w = (q - z) * s
    return tl.where(okg, w, 0.0)


@triton.jit
def affine_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, N, K, G, row_bytes, zrow_bytes, k_per_split,
                       BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr, M_ROWS: tl.constexpr,
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
                w = _dequant_tile(qw_ptr, s_ptr, z_ptr, offs_n, offs_k, N, K, G, row_bytes, zrow_bytes,
                                  BITS, GROUP, SYM)
                acc += tl.sum(w * xv[None, :], axis=1)
            # partial sums of split s go to out[s, m, :]
            tl.store(out_ptr + (pid_k * M + m) * N + offs_n, acc, mask=offs_n < N)


@triton.jit
def affine_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, N, K, G, row_bytes, zrow_bytes,
                       BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr, HALF: tl.constexpr,
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
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, offs_n, offs_k, N, K, G, row_bytes, zrow_bytes, BITS, GROUP, SYM)
        if HALF:  # fp16/bf16 activations: tensor-core dot in half precision, float32 accumulation
            acc += tl.dot(xt.to(tl.float16), tl.trans(w.to(tl.float16)), out_dtype=tl.float32)
        else:
            acc += tl.dot(xt.to(tl.float32), tl.trans(w), out_dtype=tl.float32, input_precision="ieee")
    om = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=om)
