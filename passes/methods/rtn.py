"""``rtn``: group-wise round-to-nearest (asymmetric or symmetric, 1-8 bits). Data-free baseline."""

from __future__ import annotations

from .base import Method, UniformConfig, register
from .quant import rtn_quantize


@register
class RTN(Method):
    name = "rtn"
    Config = UniformConfig
    needs_data = False

    def calibrate_block(self, ctx) -> dict:
        c = self.config
        out = {}
        for name, mod in ctx.linears.items():
            fmt = rtn_quantize(ctx.weight_of(mod), c.bits, c.group_size, c.symmetric)
            ctx.set_weight(mod, fmt.dequantize())
            out[name] = fmt
        return out
