"""The ``lowbit::*`` custom ops: the graph contract between passes, kernels and lowerings.

``lowbit::affine_embedding(ids, qweight, scales, zeros, bits, group_size, in_features)`` gathers rows of such a
weight (the embedding of a tied model whose head is compressed); ``lowbit::binary_linear``, ``lowbit::vq_linear``
and ``lowbit::matmul_nbits`` are documented where they are defined.

``lowbit::affine_linear(x, qweight, scales, zeros, bias, lora_a, lora_b, bits, group_size, in_features)``
computes ``x @ W.T + bias (+ (x @ lora_a.T) @ lora_b.T)`` where ``W`` is the
:class:`~lowbit.runtime.formats.AffineIntK` weight held by ``qweight``/``scales``/``zeros``
(``zeros`` ``None`` = symmetric). ``x`` is ``(..., in_features)`` in any float dtype; the output has
``x``'s dtype and shape ``(..., out_features)``.

The eager implementation below is the specification: dequantize, then a float matmul. Faster
implementations (``lowbit.kernels``) must match it. The op is differentiable with respect to ``x``,
the group ``scales``, ``bias`` and the low-rank factors (codes and zero points are integers and stay
frozen), so LoRA training and EfficientQAT's step-size training run through compiled models.
"""

from __future__ import annotations

from typing import Optional

import torch

from .formats import dequantize_affine, dequantize_binary, dequantize_vq

_LIB = "lowbit"


@torch.library.custom_op(f"{_LIB}::affine_linear", mutates_args=())
def affine_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    lora_a: Optional[torch.Tensor],
    lora_b: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    w = dequantize_affine(qweight, scales, zeros, bits, group_size, in_features).to(x.dtype)
    y = torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
    if lora_a is not None:
        # The low-rank branch is applied to the activations (two thin matmuls), never densified.
        y = y + torch.nn.functional.linear(
            torch.nn.functional.linear(x, lora_a.to(x.dtype)), lora_b.to(x.dtype)
        )
    return y


@affine_linear.register_fake
def _affine_linear_fake(x, qweight, scales, zeros, bias, lora_a, lora_b, bits, group_size, in_features):
    torch._check(x.shape[-1] == in_features, lambda: f"x has {x.shape[-1]} features, expected {in_features}")
    return x.new_empty((*x.shape[:-1], scales.shape[0]))


def _affine_linear_setup(ctx, inputs, output):
    x, qweight, scales, zeros, bias, lora_a, lora_b, bits, group_size, in_features = inputs
    ctx.save_for_backward(x, qweight, scales, zeros, lora_a, lora_b)
    ctx.meta = (bits, group_size, in_features, None if bias is None else bias.dtype)


def _affine_linear_backward(ctx, grad):
    """Gradients for ``x``, the group ``scales`` (codes and zeros are integers: frozen), ``bias`` and the
    low-rank factors. ``dW/dscale[n, g] = q[n, k] - z[n, g]`` for the columns ``k`` of group ``g``, which
    is what EfficientQAT's E2E-QP trains."""
    x, qweight, scales, zeros, lora_a, lora_b = ctx.saved_tensors
    bits, group_size, in_features, bias_dtype = ctx.meta
    need = ctx.needs_input_grad
    w = dequantize_affine(qweight, scales, zeros, bits, group_size, in_features)
    grad_x = grad @ w.to(grad.dtype)
    g2 = grad.reshape(-1, grad.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    grad_scales = grad_bias = grad_a = grad_b = None
    if lora_a is not None:
        xa = x2 @ lora_a.to(x2.dtype).t()  # (M, r)
        grad_x = grad_x + (grad @ lora_b.to(grad.dtype)) @ lora_a.to(grad.dtype)
        if need[5]:
            grad_a = ((g2 @ lora_b.to(g2.dtype)).t() @ x2).to(lora_a.dtype)
        if need[6]:
            grad_b = (g2.t() @ xa).to(lora_b.dtype)
    if need[2]:
        n, g = scales.shape
        gw = (g2.t().float() @ x2.float())  # dL/dW, (N, K)
        unit = dequantize_affine(qweight, torch.ones_like(scales, dtype=torch.float32), zeros, bits, group_size,
                                 in_features)  # q - z
        prod = torch.nn.functional.pad(gw * unit, (0, g * group_size - in_features))
        grad_scales = prod.view(n, g, group_size).sum(-1).to(scales.dtype)
    if bias_dtype is not None and need[4]:
        grad_bias = g2.sum(0).to(bias_dtype)
    return grad_x, None, grad_scales, None, grad_bias, grad_a, grad_b, None, None, None


affine_linear.register_autograd(_affine_linear_backward, setup_context=_affine_linear_setup)


def affine_linear_from_format(x: torch.Tensor, fmt, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Call the op with the tensors of an :class:`AffineIntK` (convenience for tests and eager code)."""
    lr = fmt.lowrank
    return torch.ops.lowbit.affine_linear(
        x, fmt.qweight, fmt.scales, fmt.zeros, bias,
        None if lr is None else lr.lora_a, None if lr is None else lr.lora_b,
        fmt.bits, fmt.group_size, fmt.in_features,
    )


# -- lowbit::binary_linear --------------------------------------------------------------------------
# ``x @ W.T + bias`` for a BiLLM :class:`~lowbit.runtime.formats.BinaryResidual` weight. The eager
# implementation (dequantize, then matmul) is the specification; differentiable with respect to ``x``.


@torch.library.custom_op(f"{_LIB}::affine_embedding", mutates_args=())
def affine_embedding(
    ids: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """Rows ``ids`` of an :class:`~lowbit.runtime.formats.AffineIntK` table, float32 ``(*ids.shape, in_features)``:
    the embedding lookup of a tied model whose head is compressed (the table *is* the head's packed weight)."""
    flat = ids.reshape(-1).long()
    rows = dequantize_affine(qweight[flat], scales[flat], None if zeros is None else zeros[flat], bits, group_size,
                             in_features)
    return rows.reshape(*ids.shape, in_features)


@affine_embedding.register_fake
def _affine_embedding_fake(ids, qweight, scales, zeros, bits, group_size, in_features):
    return scales.new_empty((*ids.shape, in_features), dtype=torch.float32)


@torch.library.custom_op(f"{_LIB}::binary_linear", mutates_args=())
def binary_linear(
    x: torch.Tensor,
    signs: torch.Tensor,
    residual_signs: torch.Tensor,
    salient_cols: torch.Tensor,
    group: torch.Tensor,
    alphas: torch.Tensor,
    mus: Optional[torch.Tensor],
    outlier_cols: Optional[torch.Tensor],
    outlier_vals: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    block_size: int,
    in_features: int,
) -> torch.Tensor:
    w = dequantize_binary(signs, residual_signs, salient_cols, group, alphas, mus, block_size, in_features,
                          outlier_cols, outlier_vals)
    return torch.nn.functional.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


@binary_linear.register_fake
def _binary_linear_fake(x, signs, residual_signs, salient_cols, group, alphas, mus, outlier_cols, outlier_vals, bias,
                        block_size, in_features):
    torch._check(x.shape[-1] == in_features, lambda: f"x has {x.shape[-1]} features, expected {in_features}")
    return x.new_empty((*x.shape[:-1], alphas.shape[0]))


def _binary_linear_setup(ctx, inputs, output):
    x, signs, residual_signs, salient_cols, group, alphas, mus, outlier_cols, outlier_vals, bias, block_size, \
        in_features = inputs
    ctx.save_for_backward(signs, residual_signs, salient_cols, group, alphas, mus, outlier_cols, outlier_vals)
    ctx.meta = (block_size, in_features)


def _binary_linear_backward(ctx, grad):
    signs, residual_signs, salient_cols, group, alphas, mus, outlier_cols, outlier_vals = ctx.saved_tensors
    w = dequantize_binary(signs, residual_signs, salient_cols, group, alphas, mus, *ctx.meta, outlier_cols,
                          outlier_vals)
    return (grad @ w.to(grad.dtype),) + (None,) * 11


binary_linear.register_autograd(_binary_linear_backward, setup_context=_binary_linear_setup)


def binary_linear_from_format(x: torch.Tensor, fmt, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return torch.ops.lowbit.binary_linear(x, fmt.signs, fmt.residual_signs, fmt.salient_cols, fmt.group,
                                          fmt.alphas, fmt.mus, fmt.outlier_cols, fmt.outlier_vals, bias,
                                          fmt.block_size, fmt.in_features)


# -- lowbit::vq_linear ------------------------------------------------------------------------------
# ``x @ W.T + bias (+ (x @ lora_a.T) @ lora_b.T)`` for a :class:`~lowbit.runtime.formats.VQCodebook`
# weight (ReALLM: vector-quantized residual plus a low-rank part). The eager implementation (decode the
# codebook entries, scale, un-permute, then matmul) is the specification; differentiable with respect to
# ``x``, ``bias`` and the low-rank factors, so ReALLM's low-rank fine-tuning runs through the packed model.


@torch.library.custom_op(f"{_LIB}::vq_linear", mutates_args=())
def vq_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebook: torch.Tensor,
    scales: torch.Tensor,
    perm: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    lora_a: Optional[torch.Tensor],
    lora_b: Optional[torch.Tensor],
    index_bits: int,
    vec_dim: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    w = dequantize_vq(codes, codebook, scales, perm, index_bits, vec_dim, group_size, in_features).to(x.dtype)
    y = torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
    if lora_a is not None:
        y = y + torch.nn.functional.linear(torch.nn.functional.linear(x, lora_a.to(x.dtype)), lora_b.to(x.dtype))
    return y


@vq_linear.register_fake
def _vq_linear_fake(x, codes, codebook, scales, perm, bias, lora_a, lora_b, index_bits, vec_dim, group_size,
                    in_features):
    torch._check(x.shape[-1] == in_features, lambda: f"x has {x.shape[-1]} features, expected {in_features}")
    return x.new_empty((*x.shape[:-1], scales.shape[0]))


def _vq_linear_setup(ctx, inputs, output):
    x, codes, codebook, scales, perm, bias, lora_a, lora_b, index_bits, vec_dim, group_size, in_features = inputs
    ctx.save_for_backward(x, codes, codebook, scales, perm, lora_a, lora_b)
    ctx.meta = (index_bits, vec_dim, group_size, in_features, None if bias is None else bias.dtype)


def _vq_linear_backward(ctx, grad):
    x, codes, codebook, scales, perm, lora_a, lora_b = ctx.saved_tensors
    index_bits, vec_dim, group_size, in_features, bias_dtype = ctx.meta
    need = ctx.needs_input_grad
    w = dequantize_vq(codes, codebook, scales, perm, index_bits, vec_dim, group_size, in_features)
    grad_x = grad @ w.to(grad.dtype)
    g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    grad_bias = grad_a = grad_b = None
    if lora_a is not None:
        grad_x = grad_x + (grad @ lora_b.to(grad.dtype)) @ lora_a.to(grad.dtype)
        if need[6]:
            grad_a = ((g2 @ lora_b.to(g2.dtype)).t() @ x2).to(lora_a.dtype)
        if need[7]:
            grad_b = (g2.t() @ (x2 @ lora_a.to(x2.dtype).t())).to(lora_b.dtype)
    if bias_dtype is not None and need[5]:
        grad_bias = g2.sum(0).to(bias_dtype)
    return grad_x, None, None, None, None, grad_bias, grad_a, grad_b, None, None, None, None


vq_linear.register_autograd(_vq_linear_backward, setup_context=_vq_linear_setup)


def vq_linear_from_format(x: torch.Tensor, fmt, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    lr = fmt.lowrank
    return torch.ops.lowbit.vq_linear(x, fmt.codes, fmt.codebook, fmt.scales, fmt.perm, bias,
                                      None if lr is None else lr.lora_a, None if lr is None else lr.lora_b,
                                      fmt.index_bits, fmt.vec_dim, fmt.group_size, fmt.in_features)


# -- lowbit::matmul_nbits ---------------------------------------------------------------------------
# ONNX Runtime's ``com.microsoft::MatMulNBits`` as a torch op, so that the ONNX lowering is a graph pass
# (``passes/ort_layout.py`` repacks ``affine_linear`` weights into this layout) whose result can still be
# run and checked in torch before it is translated one-to-one. Layout: ``b`` uint8 ``(N, k_blocks,
# block_size*bits/8)``, codes low-bits-first within a byte, the last block zero-padded; ``scales``
# ``(N, k_blocks)``; ``zero_points`` either uint8 ``(N, ceil(k_blocks*bits/8))`` packed the same way or
# float ``(N, k_blocks)``; absent = ``2**(bits-1)``. ``W[n, k] = (code - zp) * scale``.


def dequantize_matmul_nbits(b, scales, zero_points, k: int, bits: int, block_size: int) -> torch.Tensor:
    from .packing import unpack_rows

    n, kb, _ = b.shape
    codes = unpack_rows(b.reshape(n * kb, -1), bits, block_size).reshape(n, kb, block_size).float()
    if zero_points is None:
        zp = torch.full((n, kb), float(1 << (bits - 1)))
    elif zero_points.dtype == torch.uint8:
        zp = unpack_rows(zero_points, bits, kb).float()
    else:
        zp = zero_points.float()
    w = (codes - zp.unsqueeze(-1)) * scales.float().unsqueeze(-1)
    return w.reshape(n, kb * block_size)[:, :k]


@torch.library.custom_op(f"{_LIB}::matmul_nbits", mutates_args=())
def matmul_nbits(
    x: torch.Tensor,
    b: torch.Tensor,
    scales: torch.Tensor,
    zero_points: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    k: int,
    n: int,
    bits: int,
    block_size: int,
) -> torch.Tensor:
    w = dequantize_matmul_nbits(b, scales, zero_points, k, bits, block_size)
    return torch.nn.functional.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


@matmul_nbits.register_fake
def _matmul_nbits_fake(x, b, scales, zero_points, bias, k, n, bits, block_size):
    torch._check(x.shape[-1] == k, lambda: f"x has {x.shape[-1]} features, expected {k}")
    return x.new_empty((*x.shape[:-1], n))

