"""Kernel selection and the launch wrappers; registration as the CUDA implementations of the ops.

The rule (:func:`choose`), readable on purpose:

* ``M <= 8`` rows (decode, small batches): **GEMV**. The weight tile is decoded once and used for every row
  (``M_ROWS`` = M rounded up to a power of two). One program per ``BLOCK_N`` output columns (autotuned,
  16-128); if the 64-column blocks give fewer than ``2 x SMs`` programs and K is long (>= 2048), K is split
  into ``SPLIT_K`` slices (at most 8, each >= 512 columns) so that more programs stream the weight at once,
  and their float32 partial sums are added afterwards.
* more rows (prefill): **GEMM**, ``tl.dot`` tiles (autotuned, 16x64 to 128x256).

Both fuse the epilogue (bias, low-rank branch, BiLLM outlier columns, cast to the activations' dtype) into
the launch when K is not split (:func:`lowbit.kernels.triton_common.finish`).

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


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _dot_kind(dtype) -> int:
    """GEMM ``tl.dot`` precision: the activations' (fp16 1, bf16 2); fp32 activations get exact fp32 (0)."""
    return {torch.float16: 1, torch.bfloat16: 2}.get(dtype, 0)


def _launch(gemv_kernel, gemm_kernel, x, xk, n, k, wargs, fmt_dims, consts, bias, thin_t, thin_b):
    """Run the GEMV or GEMM kernel of a format on activations ``xk`` (M x K, the kernel's column order).

    ``wargs`` are the format's tensors, ``fmt_dims`` its integer sizes (both in the kernels' order);
    ``thin_t @ thin_b.T`` (M x r times r x N) is the thin term of the epilogue (low-rank branch or outlier
    columns). Returns the output shaped and typed like ``x`` with N features."""
    m = xk.shape[0]
    r = 0 if thin_t is None else thin_t.shape[1]
    kind, split = choose(m, n, k, _sm_count(x.device))
    k_per = k
    if split > 1:  # slices of whole 256-column steps; rounding may leave fewer slices than asked
        k_per = _cdiv(_cdiv(k, split), 256) * 256
        split = _cdiv(k, k_per)
    fused = split == 1
    out = torch.empty(split, m, n, device=x.device, dtype=x.dtype if fused else torch.float32)
    dummy = out  # any pointer for the arguments a constexpr flag switches off
    t = thin_t.float().contiguous() if r else dummy
    b = thin_b.contiguous() if r else dummy
    epi = dict(HAS_THIN=bool(r) and fused, HAS_BIAS=bias is not None and fused)
    common = (xk, *wargs, out, t, b, bias if bias is not None else dummy, m, n, k, r)
    if kind == "gemv":
        grid = lambda meta: (_cdiv(n, meta["BLOCK_N"]), split)  # noqa: E731
        gemv_kernel[grid](*common, k_per, *fmt_dims, **consts, **epi, M_ROWS=max(1, 1 << (m - 1).bit_length()))
    else:
        grid = lambda meta: (_cdiv(m, meta["BLOCK_M"]), _cdiv(n, meta["BLOCK_N"]))  # noqa: E731
        m_bucket = min(1 << (m - 1).bit_length(), 4096)  # autotune once per power-of-two row count
        gemm_kernel[grid](*common, m_bucket, *fmt_dims, **consts, **epi, DOT=_dot_kind(x.dtype))
    if fused:
        res = out[0]
    else:  # split-K: add the float32 partial sums, then the epilogue the kernels skipped
        res = out.sum(0)
        if r:
            res.addmm_(thin_t.float(), thin_b.float().t())
        if bias is not None:
            res += bias.float()
        res = res.to(x.dtype)
    return res.reshape(*x.shape[:-1], n)


def _low_rank(x2, lora_a, lora_b):
    """The epilogue's thin term for a low-rank branch: ``t = x @ A^T`` (M x r) and ``B`` (N x r)."""
    if lora_a is None or lora_a.shape[0] == 0:
        return None, None
    return x2.float() @ lora_a.float().t(), lora_b


def affine_linear(x, qweight, scales, zeros, bias, lora_a, lora_b, bits, group_size, in_features):
    """Triton implementation of ``lowbit::affine_linear`` (any device Triton runs on)."""
    from .triton_affine import affine_gemm_kernel, affine_gemv_kernel

    n, g = scales.shape
    x2 = x.reshape(-1, in_features).contiguous()
    zr = zeros if zeros is not None else qweight  # any pointer; unused when SYM
    t, b = _low_rank(x2, lora_a, lora_b)
    return _launch(affine_gemv_kernel, affine_gemm_kernel, x, x2, n, in_features, (qweight, scales, zr),
                   (g, qweight.shape[1], zr.shape[1]), dict(BITS=bits, GROUP=group_size, SYM=zeros is None),
                   bias, t, b)


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
    x2 = x.reshape(-1, in_features).contiguous()
    kind_c, spos, npos = column_maps(salient_cols, outlier_cols, in_features)
    mu = mus if mus is not None else alphas
    t = b = None
    if outlier_cols is not None and outlier_cols.numel():  # fp16 outlier columns: the epilogue's thin term
        t, b = x2[:, outlier_cols.long()], outlier_vals
    return _launch(binary_gemv_kernel, binary_gemm_kernel, x, x2, n, in_features,
                   (signs, residual_signs, group, alphas, mu, kind_c, spos, npos),
                   (salient_cols.numel(), nb, signs.shape[1], residual_signs.shape[1], group.shape[1]),
                   dict(BLOCK=block_size, HAS_MU=mus is not None), bias, t, b)


def vq_linear(x, codes, codebook, scales, perm, bias, lora_a, lora_b, index_bits, vec_dim, group_size, in_features):
    """Triton implementation of ``lowbit::vq_linear``."""
    from .triton_vq import vq_gemm_kernel, vq_gemv_kernel

    n, g = scales.shape
    x2 = x.reshape(-1, in_features).contiguous()
    xp = x2 if perm is None else x2.index_select(1, perm.long()).contiguous()  # stored column order
    t, b = _low_rank(x2, lora_a, lora_b)  # the low-rank branch reads x in its original column order
    return _launch(vq_gemv_kernel, vq_gemm_kernel, x, xp, n, in_features, (codes, codebook, scales),
                   (g, codes.shape[1]), dict(IBITS=index_bits, VEC=vec_dim, GROUP=group_size), bias, t, b)


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
