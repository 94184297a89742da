"""Find every linear site of an exported graph and map it to its module name.

Spellings matched (on the un-lifted ``GraphModule`` of a ``torch.export`` program, where parameters
are ``get_attr`` nodes):

* ``aten.linear(x, W, b?)`` with ``W (out, in)`` a parameter: ``nn.Linear``;
* ``aten.addmm(b, x, W)`` with ``W (in, out)`` a parameter: GPT-2's ``Conv1D``;
* ``aten.mm(x, W)`` / ``aten.matmul(x, W)`` with a 2-D parameter ``W (in, out)``.

The module name comes from the node's ``nn_module_stack`` (so a tied ``lm_head`` is ``lm_head``, not the
embedding it shares its weight with), stripped of the export wrapper's prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import PassContext, PassReport

aten = torch.ops.aten


@dataclass
class LinearSite:
    node: torch.fx.Node
    module_name: str
    kind: str  # "linear" | "addmm" | "mm"
    x: torch.fx.Node
    weight: torch.fx.Node  # get_attr
    bias: object  # get_attr node, other node, or None
    out_features: int
    in_features: int


def _module_name(node: torch.fx.Node, prefix: str) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # Export paths look like "model.model.layers.0.mlp.up_proj" (or with a "L__self__" spelling).
    path = path.replace("L__self__.", "").replace("L['self'].", "")
    return path[len(prefix):] if path.startswith(prefix) else path


def _param_shape(gm, node) -> tuple | None:
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return None
    t = gm
    for part in node.target.split("."):
        t = getattr(t, part)
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def find_sites(gm: torch.fx.GraphModule, prefix: str = "model.") -> tuple[list[LinearSite], list[tuple[str, str]]]:
    sites, skipped = [], []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        t = node.target
        if t == aten.linear.default:
            x, w = node.args[0], node.args[1]
            b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            kind, transposed = "linear", False
        elif t == aten.addmm.default:
            b, x, w = node.args[0], node.args[1], node.args[2]
            kind, transposed = "addmm", True
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                skipped.append((node.name, "addmm with alpha/beta != 1"))
                continue
        elif t in (aten.mm.default, aten.matmul.default):
            x, w, b = node.args[0], node.args[1], None
            kind, transposed = "mm", True
        else:
            continue
        shape = _param_shape(gm, w)
        name = _module_name(node, prefix) or node.name
        if shape is None or len(shape) != 2:
            if kind == "linear":
                skipped.append((name, "weight is not a 2-D parameter"))
            continue  # mm/matmul between activations is not a linear layer
        out_f, in_f = (shape[1], shape[0]) if transposed else shape
        sites.append(LinearSite(node, name, kind, x, w, b, out_f, in_f))
    return sites, skipped


class FindLinearSites:
    """Analysis pass: fills ``ctx.sites``; changes nothing."""

    name = "find-linear-sites"

    def run(self, gm, ctx: PassContext) -> PassReport:
        sites, skipped = find_sites(gm, ctx.module_prefix)
        ctx.sites = sites
        kinds = {}
        for s in sites:
            kinds[s.kind] = kinds.get(s.kind, 0) + 1
        return PassReport(self.name, changed={}, skipped=skipped,
                          details={"sites": len(sites), "by_kind": kinds})
