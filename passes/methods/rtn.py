"""``rtn``: group-wise round-to-nearest (asymmetric or symmetric, 1-8 bits). Data-free baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.runtime.formats import AffineIntK

from .base import Method, UniformConfig, register
from .quant import rtn_quantize


@register
class RTN(Method):
    name = "rtn"
    Config = UniformConfig
    needs_data = False
    device_ready = True

    def calibrate_block(self, ctx) -> dict:
        c = self.config
        out = {}
        for name, mod in ctx.linears.items():
            fmt = rtn_quantize(ctx.weight_of(mod), c.bits, c.group_size, c.symmetric)
            ctx.set_weight(mod, fmt.dequantize())
            out[name] = fmt
        return out


@dataclass
class SignConfig:
    def validate(self) -> None:
        pass

    def tag(self) -> str:
        return "w1-rowmean"


@register
class Sign(Method):
    """``sign``: naive 1-bit baseline, ``W ~ sign(W) * mean_row |W|``.

    Stored as a 1-bit symmetric :class:`AffineIntK` with one group per row (``group_size = in_features``)
    and scale ``2 * mean|w|``, so the two levels are ``+-mean|w|``.
    """

    name = "sign"
    Config = SignConfig
    needs_data = False
    device_ready = True

    def calibrate_block(self, ctx) -> dict:
        out = {}
        for name, mod in ctx.linears.items():
            w = ctx.weight_of(mod).float()
            n, k = w.shape
            scale = (2 * w.abs().mean(1, keepdim=True)).half()
            codes = (w >= 0).to(torch.uint8)
            fmt = AffineIntK.from_codes(codes, scale, None, 1, k)
            ctx.set_weight(mod, fmt.dequantize())
            out[name] = fmt
        return out
