"""Pieces every lowbit Triton kernel shares: reading packed codes, the GEMV row step, the fused epilogue,
and the tile configurations the autotuner picks from.

Each format module (:mod:`.triton_affine`, :mod:`.triton_binary`, :mod:`.triton_vq`) only supplies a *tile
decoder* — ``W[offs_n, offs_k]`` as float32 registers from its packed bytes — and two thin kernels around it:

* **GEMV** (a few rows): the tile is decoded once per K-step and multiplied with each of the ``M_ROWS``
  activation rows (``M_ROWS`` = next power of two >= M <= 8), so the weight is read and decoded once whatever M.
  Split-K programs (grid axis 1) write float32 partial sums that the wrapper adds.
* **GEMM** (many rows): ``BLOCK_M x BLOCK_N`` tiles, ``tl.dot`` on the decoded tile in the activations'
  precision (fp16 / bf16 tensor cores, or fp32 "ieee"), float32 accumulation.

Both end in :func:`finish`, the *fused epilogue*: ``out = acc + t @ B^T + bias`` stored in the output's dtype
in the same launch. ``t @ B^T`` is any thin term: the low-rank branch (``t = x @ A^T``, computed before the
launch, M x r) or BiLLM's fp16 outlier columns (``t = x[:, cols]``, ``B = vals``). Without split-K a lowbit
linear is therefore one kernel launch (plus the thin ``x @ A^T``), which matters at decode where a 576x576
layer takes a few microseconds.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"


@triton.jit
def codes(ptr, rows, cols, row_bytes, n_rows, n_cols, BITS: tl.constexpr):
    """Codes at ``rows[:, None] x cols[None, :]`` of a packed uint8 matrix, low bits first (0 outside).

    Code ``c`` of a row starts at bit ``c * BITS``; for any width 1..8 it lies within that byte and the next,
    so a code is two byte loads, a shift and a mask. Widths that divide 8 (1, 2, 4, 8) never cross a byte:
    one load."""
    bit = cols * BITS
    byte = bit // 8
    shift = bit % 8
    base = ptr + rows[:, None] * row_bytes + byte[None, :]
    ok = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    v = tl.load(base, mask=ok, other=0).to(tl.int32)
    if 8 % BITS != 0:  # 3, 5, 6, 7 bits: the code may continue into the next byte
        ok_hi = ok & ((byte[None, :] + 1) < row_bytes)
        v = v | (tl.load(base + 1, mask=ok_hi, other=0).to(tl.int32) << 8)
    return (v >> shift[None, :]) & ((1 << BITS) - 1)


@triton.jit
def gemv_step(acc, w, x_ptr, offs_k, kmask, M, K, M_ROWS: tl.constexpr):
    """``acc[m, :] += W_tile @ x[m, offs_k]`` for the ``M_ROWS`` rows (rows >= M read as 0)."""
    if M_ROWS == 1:
        xv = tl.load(x_ptr + offs_k, mask=kmask, other=0.0).to(tl.float32)
        acc += tl.sum(w * xv[None, :], axis=1)[None, :]
    else:
        rows = tl.arange(0, M_ROWS)
        for m in tl.static_range(M_ROWS):
            row_ok = (offs_k * 0 + m) < M  # (a vector: scalar masks are not portable)
            xv = tl.load(x_ptr + m * K + offs_k, mask=kmask & row_ok, other=0.0).to(tl.float32)
            part = tl.sum(w * xv[None, :], axis=1)
            acc += tl.where(rows[:, None] == m, part[None, :], 0.0)
    return acc


@triton.jit
def x_tile(x_ptr, offs_m, offs_k, M, K):
    """Activations ``x[offs_m, offs_k]`` of the row-major M x K input (0 outside)."""
    return tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :],
                   mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)


@triton.jit
def dot_step(acc, xt, w, DOT: tl.constexpr):
    """``acc += xt @ w.T`` in the activations' precision: 1 = fp16, 2 = bf16 (tensor cores), 0 = fp32 (exact)."""
    if DOT == 1:
        acc += tl.dot(xt.to(tl.float16), tl.trans(w.to(tl.float16)), out_dtype=tl.float32)
    elif DOT == 2:
        acc += tl.dot(xt.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)), out_dtype=tl.float32)
    else:
        acc += tl.dot(xt.to(tl.float32), tl.trans(w), out_dtype=tl.float32, input_precision="ieee")
    return acc


@triton.jit
def finish(acc, offs_m, offs_n, out_ptr, t_ptr, lb_ptr, bias_ptr, M, N, R,
           HAS_THIN: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Fused epilogue: ``out[offs_m, offs_n] = acc + t[offs_m] @ B[offs_n]^T + bias[offs_n]`` in out's dtype."""
    mm = offs_m < M
    nm = offs_n < N
    if HAS_THIN:  # R outer products (R = rank or outlier count: a handful to a few dozen)
        for r in range(R):
            tv = tl.load(t_ptr + offs_m * R + r, mask=mm, other=0.0).to(tl.float32)
            bv = tl.load(lb_ptr + offs_n * R + r, mask=nm, other=0.0).to(tl.float32)
            acc += tv[:, None] * bv[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=nm, other=0.0).to(tl.float32)[None, :]
    ptrs = out_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mm[:, None] & nm[None, :])


def _configs(kind: str) -> list:
    """Candidate tiles for the autotuner (timed once per shape on a GPU; one fixed tile under the interpreter)."""
    if kind == "gemv":
        if INTERPRET:
            return [triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4)]
        return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                for bn, bk, w, s in ((32, 128, 4, 2), (64, 64, 4, 2), (64, 128, 4, 2), (64, 256, 8, 2),
                                     (128, 64, 4, 2), (128, 128, 8, 2), (16, 256, 4, 3), (32, 256, 4, 3))]
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in ((16, 64, 64, 4, 3), (16, 128, 64, 4, 3), (32, 64, 64, 4, 3),
                                     (64, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 128, 32, 8, 3),
                                     (128, 64, 64, 8, 3), (64, 256, 32, 8, 3))]


GEMV_CONFIGS = _configs("gemv")
GEMM_CONFIGS = _configs("gemm")
# Autotuning key: the shape class, rounded so that decode steps of varying M share one timing.
GEMV_KEY = ["N", "K", "M_ROWS"]
GEMM_KEY = ["N", "K", "M_BUCKET"]
