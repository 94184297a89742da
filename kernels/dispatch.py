"""Kernel selection and the launch wrappers; registration as the CUDA implementations of the ops.

The rule (:func:`choose`), readable on purpose:

* ``M <= 8`` rows (decode): **GEMV**. One program per ``BLOCK_N`` = 64 output columns; if that gives
  fewer than ``2 x SMs`` programs and K is long (>= 2048), the K range is split into ``SPLIT_K`` slices
  (at most 8, each >= 512 columns) so that more programs stream the weight at once.
* more rows (prefill): **GEMM** with 64 x 64 x 32 tiles (``tl.dot``).

``LOWBIT_REFERENCE=1`` in the environment, or :func:`force_reference(True)`, makes every op run its
eager reference (dequantize, then matmul) instead, for debugging.
"""

from __future__ import annotations

import os
import torch

_FORCE_REFERENCE = False


def force_reference(on: bool = True) -> None:
    """Make the lowbit ops ignore the Triton kernels (also: ``LOWBIT_REFERENCE=1``)."""
    global _FORCE_REFERENCE
    _FORCE_REFERENCE = on


def reference_forced() -> bool:
    return _FORCE_REFERENCE or os.environ.get("LOWBIT_REFERENCE", "") not in ("", "0")


def _sm_count(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: any small number keeps the rule exercised


def choose(m: int, n: int, k: int, sms: int = 132) -> tuple[str, int]:
    """``("gemv", split_k)`` or ``("gemm", 1)`` for an ``(m x k) @ (k x n)`` product."""
    if m > 8:
        return "gemm", 1
    programs = -(-n // 64)
    split = 1
    if programs < 2 * sms and k >= 2048:
        split = min(8, max(1, (2 * sms) // max(programs, 1)), k // 512)
    return "gemv", max(1, split)


def _launch_gemv(kernel, x2, n, k, args, consts, split, device):
    m = x2.shape[0]
    k_per = -(-k // split)
    k_per = -(-k_per // 64) * 64
    split = -(-k // k_per)
    part = torch.empty(split, m, n, device=device, dtype=torch.float32)
    grid = (triton_cdiv(n, 64), split)
    kernel[grid](x2, *args[:-1], part, *args[-1], k_per, **consts, M_ROWS=8, BLOCK_N=64, BLOCK_K=64)
    return part.sum(0) if split > 1 else part[0]


def triton_cdiv(a, b):
    return -(-a // b)


def _epilogue(out, x, x2, lora_a, lora_b, bias):
    """Add the low-rank branch and the bias to the fp32 kernel output in place, cast and reshape like ``x``."""
    if lora_a is not None:  # thin low-rank branch, added in place (no extra full-size temporary)
        out.addmm_(x2.float() @ lora_a.float().t(), lora_b.float().t())
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], out.shape[1])


def affine_linear(x, qweight, scales, zeros, bias, lora_a, lora_b, bits, group_size, in_features):
    """Triton implementation of ``lowbit::affine_linear`` (any device Triton runs on)."""
    from .triton_affine import affine_gemm_kernel, affine_gemv_kernel

    n, g = scales.shape
    k = in_features
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    zr = zeros if zeros is not None else qweight  # any pointer; unused when SYM
    dims = (m, n, k, g, qweight.shape[1], zr.shape[1])
    consts = dict(BITS=bits, GROUP=group_size, SYM=zeros is None)
    kind, split = choose(m, n, k, _sm_count(x.device))
    if kind == "gemv":
        out = _launch_gemv(affine_gemv_kernel, x2, n, k, (qweight, scales, zr, dims), consts, split, x.device)
    else:
        out = torch.empty(m, n, device=x.device, dtype=torch.float32)
        grid = (triton_cdiv(m, 64), triton_cdiv(n, 64))
        affine_gemm_kernel[grid](x2, qweight, scales, zr, out, *dims, **consts,
                                 HALF=x.dtype in (torch.float16, torch.bfloat16), BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
    return _epilogue(out, x, x2, lora_a, lora_b, bias)


_MAPS: dict = {}


def column_maps(salient_cols: torch.Tensor, outlier_cols, k: int):
    """Per column: kind (0 plain, 1 salient, 2 outlier), position among salient / non-salient columns."""
    key = (salient_cols.data_ptr(), None if outlier_cols is None else outlier_cols.data_ptr(), k, salient_cols.device)
    hit = _MAPS.get(key)
    if hit is not None:
        return hit
    dev = salient_cols.device
    sal = salient_cols.long()
    kind = torch.zeros(k, dtype=torch.int8, device=dev)
    kind[sal] = 1
    spos = torch.zeros(k, dtype=torch.int32, device=dev)
    spos[sal] = torch.arange(sal.numel(), dtype=torch.int32, device=dev)
    # the group bitmap covers every non-salient column (outlier columns included, their bit unused)
    non = kind == 0
    npos = torch.where(non, torch.cumsum(non.to(torch.int32), 0) - 1, 0).to(torch.int32)
    if outlier_cols is not None:
        kind[outlier_cols.long()] = 2
    if len(_MAPS) > 4096:
        _MAPS.clear()
    _MAPS[key] = (kind, spos, npos)
    return kind, spos, npos


def binary_linear(x, signs, residual_signs, salient_cols, group, alphas, mus, outlier_cols, outlier_vals, bias,
                  block_size, in_features):
    """Triton implementation of ``lowbit::binary_linear``."""
    from .triton_binary import binary_gemm_kernel, binary_gemv_kernel

    n, nb = alphas.shape[0], alphas.shape[1]
    k = in_features
    s = salient_cols.numel()
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    kind_c, spos, npos = column_maps(salient_cols, outlier_cols, k)
    mu = mus if mus is not None else alphas
    dims = (m, n, k, s, nb, signs.shape[1], residual_signs.shape[1], group.shape[1])
    ptrs = (signs, residual_signs, group, alphas, mu, kind_c, spos, npos)
    consts = dict(BLOCK=block_size, HAS_MU=mus is not None)
    kind, split = choose(m, n, k, _sm_count(x.device))
    if kind == "gemv":
        out = _launch_gemv(binary_gemv_kernel, x2, n, k, (*ptrs, dims), consts, split, x.device)
    else:
        out = torch.empty(m, n, device=x.device, dtype=torch.float32)
        grid = (triton_cdiv(m, 64), triton_cdiv(n, 64))
        binary_gemm_kernel[grid](x2, *ptrs, out, *dims, **consts, HALF=x.dtype in (torch.float16, torch.bfloat16),
                                 BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
    if outlier_cols is not None and outlier_cols.numel():
        out.addmm_(x2[:, outlier_cols.long()].float(), outlier_vals.float().t())
    return _epilogue(out, x, x2, None, None, bias)


def vq_linear(x, codes, codebook, scales, perm, bias, lora_a, lora_b, index_bits, vec_dim, group_size, in_features):
    """Triton implementation of ``lowbit::vq_linear``."""
    from .triton_vq import vq_gemm_kernel, vq_gemv_kernel

    n, g = scales.shape
    k = in_features
    x2 = x.reshape(-1, k).contiguous()
    xp = x2 if perm is None else x2.index_select(1, perm.long()).contiguous()  # stored column order
    m = x2.shape[0]
    dims = (m, n, k, g, codes.shape[1])
    consts = dict(IBITS=index_bits, VEC=vec_dim, GROUP=group_size)
    kind, split = choose(m, n, k, _sm_count(x.device))
    if kind == "gemv":
        out = _launch_gemv(vq_gemv_kernel, xp, n, k, (codes, codebook, scales, dims), consts, split, x.device)
    else:
        out = torch.empty(m, n, device=x.device, dtype=torch.float32)
        grid = (triton_cdiv(m, 64), triton_cdiv(n, 64))
        vq_gemm_kernel[grid](xp, codes, codebook, scales, out, *dims, **consts,
                             HALF=x.dtype in (torch.float16, torch.bfloat16), BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
    return _epilogue(out, x, x2, lora_a, lora_b, bias)  # x2: the original (un-permuted) column order


_REGISTERED = False


def register_cuda() -> bool:
    """Register the Triton wrappers as the CUDA implementations of the lowbit ops (idempotent).

    The registered function checks :func:`reference_forced` at every call."""
    global _REGISTERED
    if _REGISTERED:
        return True
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    from lowbit.runtime import ops
    from lowbit.runtime.formats import dequantize_affine, dequantize_binary, dequantize_vq

    def affine_cuda(x, qweight, scales, zeros, bias, lora_a, lora_b, bits, group_size, in_features):
        if reference_forced():
            w = dequantize_affine(qweight, scales, zeros, bits, group_size, in_features, lora_a, lora_b)
            return torch.nn.functional.linear(x, w.to(x.device, x.dtype), None if bias is None else bias.to(x.dtype))
        return affine_linear(x, qweight, scales, zeros, bias, lora_a, lora_b, bits, group_size, in_features)

    def binary_cuda(x, signs, residual_signs, salient_cols, group, alphas, mus, outlier_cols, outlier_vals, bias,
                    block_size, in_features):
        if reference_forced():
            w = dequantize_binary(signs, residual_signs, salient_cols, group, alphas, mus, block_size, in_features,
                                  outlier_cols, outlier_vals)
            return torch.nn.functional.linear(x, w.to(x.device, x.dtype), None if bias is None else bias.to(x.dtype))
        return binary_linear(x, signs, residual_signs, salient_cols, group, alphas, mus, outlier_cols, outlier_vals,
                             bias, block_size, in_features)

    def vq_cuda(x, codes, codebook, scales, perm, bias, lora_a, lora_b, index_bits, vec_dim, group_size, in_features):
        if reference_forced():
            w = dequantize_vq(codes, codebook, scales, perm, index_bits, vec_dim, group_size, in_features, lora_a,
                              lora_b)
            return torch.nn.functional.linear(x, w.to(x.device, x.dtype), None if bias is None else bias.to(x.dtype))
        return vq_linear(x, codes, codebook, scales, perm, bias, lora_a, lora_b, index_bits, vec_dim, group_size,
                         in_features)

    ops.affine_linear.register_kernel("cuda")(affine_cuda)
    ops.vq_linear.register_kernel("cuda")(vq_cuda)
    ops.binary_linear.register_kernel("cuda")(binary_cuda)
    _REGISTERED = True
    return True
