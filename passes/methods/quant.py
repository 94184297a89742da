"""Uniform group-wise quantizer shared by the uniform methods (rtn, gptq, and later the training methods).

Conventions match :class:`lowbit.runtime.formats.AffineIntK`:

* asymmetric: range ``[min(w, 0), max(w, 0)]`` (zero always representable, as in GPTQ), scale
  ``(max - min) / (2**bits - 1)`` rounded to fp16 *before* codes are computed, integer zero point
  ``round(-min / scale)`` clamped to the code range;
* symmetric: scale ``max|w| / ((2**bits - 1) / 2)`` (fp16), implicit half-integer midpoint zero.

Scales are rounded to their stored precision first so that the codes chosen are the best codes for
the scale that is actually stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

_TINY = 1e-8


@dataclass
class GroupParams:
    """Per-row parameters of one group of columns: ``scale (N,)`` and float ``zero (N,)``."""

    scale: torch.Tensor
    zero: torch.Tensor  # integer-valued (asymmetric) or the midpoint (symmetric)


def group_params(w: torch.Tensor, bits: int, symmetric: bool) -> GroupParams:
    """Scale and zero point for each row of ``w (N, g)``."""
    maxq = (1 << bits) - 1
    w = w.float()
    if symmetric:
        amax = w.abs().amax(dim=1)
        scale = amax / (maxq / 2.0)
        scale = torch.where(scale > _TINY, scale, torch.ones_like(scale))
        scale = scale.to(torch.float16).float()
        zero = torch.full_like(scale, maxq / 2.0)
        return GroupParams(scale, zero)
    wmin = w.amin(dim=1).clamp(max=0)
    wmax = w.amax(dim=1).clamp(min=0)
    scale = (wmax - wmin) / maxq
    # An all-zero group gets scale 1 and zero 0, which dequantizes to exact zeros.
    scale = torch.where(scale > _TINY, scale, torch.ones_like(scale))
    scale = scale.to(torch.float16).float()
    # fp16 rounding can also overflow huge ranges to inf: refuse rather than write inf scales.
    if not torch.isfinite(scale).all():
        raise ValueError("weight range exceeds float16 scales (|w| > 65504 * levels)")
    zero = torch.round(-wmin / scale).clamp(0, maxq)
    return GroupParams(scale, zero)


def quantize_codes(w: torch.Tensor, p: GroupParams, bits: int) -> torch.Tensor:
    """Codes ``(N, g)`` of ``w`` under ``p`` (float tensor holding integers in ``[0, 2**bits-1]``)."""
    maxq = (1 << bits) - 1
    return torch.clamp(torch.round(w.float() / p.scale[:, None] + p.zero[:, None]), 0, maxq)


def assemble(
    codes: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], bits: int, group_size: int
):
    """Pack unpacked codes/scales/zeros into an :class:`AffineIntK`."""
    from lowbit.runtime.formats import AffineIntK

    return AffineIntK.from_codes(
        codes.to(torch.uint8),
        scales,
        None if zeros is None else zeros.to(torch.uint8),
        bits,
        group_size,
    )


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """Round-to-nearest, group-wise: returns an :class:`AffineIntK` for ``w (N, K)``."""
    n, k = w.shape
    dev = w.device  # --device cuda: computed there, assembled on the CPU
    codes = torch.empty(n, k, device=dev)
    ngroups = (k + group_size - 1) // group_size
    scales = torch.empty(n, ngroups, device=dev)
    zeros = torch.empty(n, ngroups, device=dev)
    for g in range(ngroups):
        sl = slice(g * group_size, min(k, (g + 1) * group_size))
        p = group_params(w[:, sl], bits, symmetric)
        codes[:, sl] = quantize_codes(w[:, sl], p, bits)
        scales[:, g] = p.scale
        zeros[:, g] = p.zero
    return assemble(codes, scales, None if symmetric else zeros, bits, group_size)
