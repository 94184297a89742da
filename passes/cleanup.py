"""Clean up: drop dead nodes and every float weight a lowbit op replaced.

After this pass no float copy of a quantized weight is left in the program. A float weight that is
still used elsewhere (a weight shared with a layer that was not compressed) is kept and reported.
"""

from __future__ import annotations

from .base import PassContext, PassReport


def _delattr_path(root, target: str) -> None:
    *parents, leaf = target.split(".")
    mod = root
    for p in parents:
        mod = getattr(mod, p)
    delattr(mod, leaf)


class CleanUp:
    name = "clean-up"

    def run(self, gm, ctx: PassContext) -> PassReport:
        rep = PassReport(self.name)
        gm.graph.eliminate_dead_code()
        used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        removed = freed = 0
        for module, info in ctx.replaced.items():
            target = info["float_weight"]
            if target in used:
                rep.skipped.append((module, f"float weight {target} is still used by another node"))
                continue
            try:
                t = gm.get_parameter(target)
            except AttributeError:
                try:
                    t = gm.get_buffer(target)
                except AttributeError:
                    continue  # already removed (weight shared by two replaced sites)
            freed += t.numel() * t.element_size()
            _delattr_path(gm, target)
            removed += 1
        gm.delete_all_unused_submodules()
        rep.changed["float weights removed"] = removed
        rep.details["float_bytes_removed"] = freed
        return rep
