"""The ``lowbit::*`` custom ops: the graph contract between passes, kernels and lowerings.

``lowbit::affine_linear(x, qweight, scales, zeros, bias, lora_a, lora_b, bits, group_size, in_features)``
computes ``x @ W.T + bias (+ (x @ lora_a.T) @ lora_b.T)`` where ``W`` is the
:class:`~lowbit.runtime.formats.AffineIntK` weight held by ``qweight``/``scales``/``zeros``
(``zeros`` ``None`` = symmetric). ``x`` is ``(..., in_features)`` in any float dtype; the output has
``x``'s dtype and shape ``(..., out_features)``.

The eager implementation below is the specification: dequantize, then a float matmul. Faster
implementations (``lowbit.kernels``) must match it. The op is differentiable with respect to ``x``
(the packed weight is frozen), so LoRA-style training can run through compiled models.
"""

from __future__ import annotations

from typing import Optional

import torch

from .formats import dequantize_affine, dequantize_binary

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
    ctx.save_for_backward(qweight, scales, zeros, lora_a, lora_b)
    ctx.meta = (bits, group_size, in_features)


def _affine_linear_backward(ctx, grad):
    qweight, scales, zeros, lora_a, lora_b = ctx.saved_tensors
    bits, group_size, in_features = ctx.meta
    w = dequantize_affine(qweight, scales, zeros, bits, group_size, in_features, lora_a, lora_b)
    grad_x = grad @ w.to(grad.dtype)
    return grad_x, None, None, None, None, None, None, None, None, None


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
