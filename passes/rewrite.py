"""Rewrite: replace each linear site that has a calibration result by its lowbit op.

Each format kind has an *emitter* that registers the packed tensors as buffers of the graph module
and inserts the op call. The new node takes the old node's metadata (``nn_module_stack``, ``val``), so
later passes and lowerings still know which module it came from. A site whose result does not fit
(shape mismatch) is skipped and reported, never mis-compiled.
"""

from __future__ import annotations

import torch

from lowbit.runtime import ops as _ops  # noqa: F401  (registers torch.ops.lowbit.*)
from lowbit.runtime.formats import AffineIntK, BinaryResidual, VQCodebook

from .base import PassContext, PassReport


def buffer_prefix(module_name: str) -> str:
    return "lowbit__" + module_name.replace(".", "__")


# Argument list of each format's op: "x" and "bias" come from the site, other strings name the
# format's tensors (None when absent), and ("attr", name) takes an integer attribute of the format.
OP_SIGNATURES = {
    AffineIntK.kind: (torch.ops.lowbit.affine_linear.default,
                      ["x", "qweight", "scales", "zeros", "bias", "lora_a", "lora_b",
                       ("attr", "bits"), ("attr", "group_size"), ("attr", "in_features")]),
    BinaryResidual.kind: (torch.ops.lowbit.binary_linear.default,
                          ["x", "signs", "residual_signs", "salient_cols", "group", "alphas", "mus",
                           "outlier_cols", "outlier_vals", "bias",
                           ("attr", "block_size"), ("attr", "in_features")]),
    VQCodebook.kind: (torch.ops.lowbit.vq_linear.default,
                      ["x", "codes", "codebook", "scales", "perm", "bias", "lora_a", "lora_b",
                       ("attr", "index_bits"), ("attr", "vec_dim"), ("attr", "group_size"), ("attr", "in_features")]),
}

# Position of the bias argument of each op (the verify pass reads it).
BIAS_ARG = {op: args.index("bias") for op, args in OP_SIGNATURES.values()}


def emit(gm, site, fmt, attrs: dict) -> torch.fx.Node:
    """Insert the op call for ``fmt`` at ``site`` (``attrs``: tensor name -> graph buffer name)."""
    op, signature = OP_SIGNATURES[fmt.kind]
    args = []
    for a in signature:
        if a == "x":
            args.append(site.x)
        elif a == "bias":
            args.append(site.bias if isinstance(site.bias, torch.fx.Node) else None)
        elif isinstance(a, tuple):
            args.append(getattr(fmt, a[1]))
        else:
            args.append(gm.graph.get_attr(attrs[a]) if a in attrs else None)
    return gm.graph.call_function(op, tuple(args))


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
            if fmt.kind not in OP_SIGNATURES:
                rep.skipped.append((site.module_name, f"no emitter for format {fmt.kind!r}"))
                continue
            pre = buffer_prefix(site.module_name)
            attrs = {}
            for tname, t in fmt.tensors().items():
                attr = f"{pre}__{tname}"
                gm.register_buffer(attr, t.contiguous())
                attrs[tname] = attr
            with gm.graph.inserting_before(site.node):
                new = emit(gm, site, fmt, attrs)
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
