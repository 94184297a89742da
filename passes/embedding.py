"""``tie-embedding``: a tied model whose head was compressed looks its tokens up in the head's packed weight.

With ``tie_word_embeddings`` the input embedding and ``lm_head`` are one matrix. When a rule compresses the head,
the embedding would otherwise keep the float matrix (the largest tensor of a small model: 113 MB of SmolLM2's
540) and the two would disagree. This pass replaces each ``aten.embedding`` whose float table equals the head's
float weight by ``lowbit::affine_embedding`` on the head's packed tensors, so the program, every lowering
(``GatherBlockQuantized`` in ONNX Runtime) and the artifact hold one table, packed. Runs before clean-up, which
then drops the float matrix. Asymmetric affine heads only (other formats keep the float embedding, reported).
"""

from __future__ import annotations

import torch

from lowbit.runtime import ops as _ops  # noqa: F401  (registers torch.ops.lowbit.*)
from lowbit.runtime.formats import AffineIntK

from .base import PassContext, PassReport
from .ort_layout import _fetch


class TieEmbedding:
    name = "tie-embedding"

    def __init__(self, head: str = "lm_head"):
        self.head = head

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassReport:
        rep = PassReport(self.name)
        fmt = ctx.results.get(self.head)
        float_w = ctx.float_weights.get(self.head) if ctx.float_weights else None
        site = ctx.replaced.get(self.head)
        if fmt is None or site is None:
            return rep
        if not isinstance(fmt, AffineIntK) or fmt.lowrank is not None or fmt.symmetric:
            rep.skipped.append((self.head, "only an asymmetric affine head without low-rank branch holds the "
                                           "embedding; it stays float"))
            return rep
        head_node = next((n for n in gm.graph.nodes if n.op == "call_function"
                          and n.target == torch.ops.lowbit.affine_linear.default
                          and n.meta.get("lowbit_module") == self.head), None)
        if head_node is None:
            return rep
        _, qw, sc, zr = head_node.args[:4]
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target != torch.ops.aten.embedding.default:
                continue
            table = node.args[0]
            if table.op != "get_attr":
                continue
            w = _fetch(gm, table)
            tied = table.target == site.get("float_weight") or (
                float_w is not None and w.shape == float_w.shape and torch.equal(w.float(), float_w.float()))
            if not tied:
                continue
            with gm.graph.inserting_before(node):  # the head's tensors, read again where the lookup is
                tensors = [None if a is None else gm.graph.get_attr(a.target) for a in (qw, sc, zr)]
                new = gm.graph.call_function(torch.ops.lowbit.affine_embedding.default,
                                             (node.args[1], *tensors, fmt.bits, fmt.group_size, fmt.in_features))
            new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "val")})
            new.meta["lowbit_module"] = "embedding (tied to " + self.head + ")"
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            rep.changed["embedding tied to the packed head"] = rep.changed.get("embedding tied to the packed head",
                                                                             0) + 1
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return rep
