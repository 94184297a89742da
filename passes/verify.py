"""Verify: per-layer output error of each replaced site against the float layer.

Runs the rewritten graph on one calibration batch. At every lowbit node it also computes the float
layer on the *same* input (the quantized chain), and records
``SQNR = 10 log10(||y_float||^2 / ||y_float - y_lowbit||^2)`` in dB. Must run before clean-up, or be
given ``ctx.float_weights``.
"""

from __future__ import annotations

import math

import torch

from .base import PassContext, PassReport
from .rewrite import BIAS_ARG


class Verify:
    name = "verify"

    def __init__(self, max_tokens: int = 2048):
        self.max_tokens = max_tokens

    def run(self, gm, ctx: PassContext) -> PassReport:
        rep = PassReport(self.name)
        if ctx.calib_batch is None:
            rep.skipped.append(("*", "no calibration batch given"))
            return rep
        by_node = {v["node"]: m for m, v in ctx.replaced.items()}
        metrics = ctx.metrics

        class Probe(torch.fx.Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                module = by_node.get(n.name)
                if module is not None:
                    x = self.env[n.args[0]]
                    b = n.args[BIAS_ARG[n.target]]
                    bias = self.env[b] if isinstance(b, torch.fx.Node) else None
                    w = ctx.float_weights[module].to(x.dtype)
                    ref = torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
                    sig = float(ref.double().pow(2).sum())
                    noise = float((ref.double() - out.double()).pow(2).sum())
                    metrics.setdefault(module, {})["sqnr_db"] = (
                        math.inf if noise == 0 else 10 * math.log10(max(sig, 1e-30) / noise)
                    )
                    metrics[module]["rel_err"] = math.sqrt(noise / max(sig, 1e-30))
                return out

        ids = ctx.calib_batch.reshape(1, -1)[:, : self.max_tokens]
        with torch.no_grad():
            Probe(gm).run(ids)
        rep.changed["layers measured"] = len([m for m in ctx.replaced if "sqnr_db" in metrics.get(m, {})])
        finite = [metrics[m]["sqnr_db"] for m in ctx.replaced if math.isfinite(metrics.get(m, {}).get("sqnr_db", math.nan))]
        if finite:
            rep.details = {"min_sqnr_db": min(finite), "mean_sqnr_db": sum(finite) / len(finite)}
        return rep
