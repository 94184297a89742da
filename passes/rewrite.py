"""Rewrite: replace each linear site that has a calibration result by its lowbit op.

Each format kind has an *emitter* that registers the packed tensors as buffers of the graph module
and inserts the op call. The new node takes the old node's metadata (``nn_module_stack``, ``val``), so
later passes and lowerings still know which module it came from. A site whose result does not fit
(shape mismatch) is skipped and reported, never mis-compiled.
"""

from __future__ import annotations

import torch

from lowbit.runtime.formats import AffineIntK, BinaryResidual

from .base import PassContext, PassReport


def buffer_prefix(module_name: str) -> str:
    return "lowbit__" + module_name.replace(".", "__")


def _emit_affine(gm, site, fmt: AffineIntK, attrs: dict) -> torch.fx.Node:
    g = gm.graph
    get = {k: g.get_attr(v) for k, v in attrs.items()}
    bias = site.bias if isinstance(site.bias, torch.fx.Node) else None
    return g.call_function(
        torch.ops.lowbit.affine_linear.default,
        (site.x, get["qweight"], get["scales"], get.get("zeros"), bias,
         get.get("lora_a"), get.get("lora_b"), fmt.bits, fmt.group_size, fmt.in_features),
    )


def _emit_binary(gm, site, fmt: BinaryResidual, attrs: dict) -> torch.fx.Node:
    g = gm.graph
    get = {k: g.get_attr(v) for k, v in attrs.items()}
    bias = site.bias if isinstance(site.bias, torch.fx.Node) else None
    return g.call_function(
        torch.ops.lowbit.binary_linear.default,
        (site.x, get["signs"], get["residual_signs"], get["salient_cols"], get["group"], get["alphas"],
         get.get("mus"), bias, fmt.block_size, fmt.in_features),
    )


EMITTERS = {AffineIntK.kind: _emit_affine, BinaryResidual.kind: _emit_binary}

# Position of the bias argument of each op (the verify pass reads it).
BIAS_ARG = {torch.ops.lowbit.affine_linear.default: 4, torch.ops.lowbit.binary_linear.default: 7}


class ReplaceLinears:
    name = "replace-linears"

    def run(self, gm, ctx: PassContext) -> PassReport:
        rep = PassReport(self.name)
        used = set()
        for site in ctx.sites:
            fmt = ctx.results.get(site.module_name)
            if fmt is None:
                rep.skipped.append((site.module_name, "no calibration result (outside the compressed blocks; kept float)"))
                continue
            if (fmt.out_features, fmt.in_features) != (site.out_features, site.in_features):
                rep.skipped.append((site.module_name, f"result is {fmt.out_features}x{fmt.in_features}, "
                                    f"site is {site.out_features}x{site.in_features}"))
                continue
            if site.module_name in used:
                rep.skipped.append((site.module_name, "module called more than once; replaced at first call only"))
                continue
            emitter = EMITTERS.get(fmt.kind)
            if emitter is None:
                rep.skipped.append((site.module_name, f"no emitter for format {fmt.kind!r}"))
                continue
            pre = buffer_prefix(site.module_name)
            attrs = {}
            for tname, t in fmt.tensors().items():
                attr = f"{pre}__{tname}"
                gm.register_buffer(attr, t.contiguous())
                attrs[tname] = attr
            with gm.graph.inserting_before(site.node):
                new = emitter(gm, site, fmt, attrs)
            new.meta.update({k: v for k, v in site.node.meta.items() if k in ("nn_module_stack", "val", "stack_trace", "source_fn_stack")})
            new.meta["lowbit_module"] = site.module_name
            site.node.replace_all_uses_with(new)
            gm.graph.erase_node(site.node)
            ctx.replaced[site.module_name] = {"attrs": attrs, "float_weight": site.weight.target,
                                              "node": new.name, "format": fmt.kind}
            used.add(site.module_name)
            key = f"{fmt.kind}:{getattr(fmt, 'bits', 1)}bit"
            rep.changed[key] = rep.changed.get(key, 0) + 1
        missing = set(ctx.results) - used
        for m in sorted(missing):
            rep.skipped.append((m, "calibrated, but no matching linear site in the graph"))
        if missing:
            raise RuntimeError(f"{len(missing)} calibrated module(s) have no site in the graph, e.g. {sorted(missing)[0]}")
        return rep
