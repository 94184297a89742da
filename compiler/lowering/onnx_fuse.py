"""Sibling ``MatMulNBits`` nodes (same input, same field and blocks) merged into one wide node.

Batch-1 decode in ONNX Runtime pays a fixed cost per kernel call (thread-pool dispatch, activation
quantization per call at ``accuracy_level`` 4): q/k/v and gate/up read the same activation, so one node with
their rows stacked does the same arithmetic in one call. ``MatMulNBits`` stores everything row-major by output
row (``B (N, blocks, blob)``, ``scales`` and ``zero_points`` per row, packed zero points padded per row), so
the merged initializers are the concatenations along ``N`` and the result is exact: each output row is computed
from its own bytes as before. The merged output is split back into the original output names, so nothing
downstream changes; the caller may instead feed the wide output to a consumer that takes it packed
(``GroupQueryAttention``'s packed QKV input).
"""

from __future__ import annotations

import numpy as np

from .onnx_graph import MSFT, GraphBuilder

_SAME = ("K", "bits", "block_size", "accuracy_level")


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def fuse_matmulnbits(g: GraphBuilder, node_names: list[str], name: str) -> dict | None:
    """Merge the ``MatMulNBits`` nodes called ``node_names`` (in that row order) into one node ``name`` followed
    by a ``Split`` into their original outputs. Float ``MatMul`` nodes with a ``(K, N)`` initializer weight merge
    the same way (the float baseline gets the same treatment). Returns ``{"output", "split", "sizes"}`` or
    ``None`` (nothing changed) when they are not siblings: a node is missing, or inputs, ``K``, bits, blocks,
    accuracy level or the zero points' kind differ."""
    from onnx import numpy_helper

    pos = {n.name: i for i, n in enumerate(g.nodes)}
    if len(node_names) < 2 or any(n not in pos for n in node_names):
        return None
    nodes = [g.nodes[pos[n]] for n in node_names]
    kind = (nodes[0].op_type, nodes[0].domain)
    if kind not in (("MatMulNBits", MSFT), ("MatMul", "")) or any((n.op_type, n.domain) != kind for n in nodes):
        return None
    attrs = [_attrs(n) for n in nodes]
    if any(n.input[0] != nodes[0].input[0] or len(n.input) != len(nodes[0].input) for n in nodes):
        return None
    if any(a.get(k) != attrs[0].get(k) for a in attrs for k in _SAME) or any("g_idx" in a for a in attrs):
        return None
    inits = {t.name: i for i, t in enumerate(g.inits)}
    if any(x not in inits for n in nodes for x in n.input[1:]):
        return None
    arrays = [[numpy_helper.to_array(g.inits[inits[x]]) for x in n.input[1:]] for n in nodes]
    if any(a.dtype != b.dtype for arr in arrays for a, b in zip(arr, arrays[0])):
        return None
    if kind[0] == "MatMul":
        if any(arr[0].ndim != 2 or arr[0].shape[0] != arrays[0][0].shape[0] for arr in arrays):
            return None
        sizes = [int(arr[0].shape[1]) for arr in arrays]
        merged = [g.init(f"{name}.weight_t", np.concatenate([arr[0] for arr in arrays], axis=1))]
    else:
        sizes = [int(a["N"]) for a in attrs]
        # row-major by output row (1-D zero points are padded per row): stacking rows is concatenating
        merged = [g.init(f"{name}.{base}", np.concatenate([arr[j] for arr in arrays], axis=0))
                  for j, base in enumerate(("B", "scales", "zp")[: len(arrays[0])])]
    first = pos[node_names[0]]
    outs = [n.output[0] for n in nodes]
    for n in nodes:  # their initializers go with them (each was read by that node only)
        g.nodes.remove(n)
    drop = {x for n in nodes for x in n.input[1:]}
    g.inits[:] = [t for t in g.inits if t.name not in drop]
    tail = g.nodes[first:]
    del g.nodes[first:]
    if kind[0] == "MatMul":
        y = g.op("MatMul", [nodes[0].input[0], *merged], name=name)
    else:
        y = g.op("MatMulNBits", [nodes[0].input[0], *merged], domain=MSFT, name=name, **dict(attrs[0], N=sum(sizes)))
    g.op("Split", [y, g.const_i64(f"{name}.sizes", sizes)], n_out=len(outs), name=f"{name}.split", axis=-1)
    split = g.nodes[-1]
    for i, o in enumerate(outs):
        split.output[i] = o
    g.nodes.extend(tail)
    return {"output": y, "split": split, "sizes": sizes}


def drop_split(g: GraphBuilder, fused: dict) -> str:
    """Remove a merge's ``Split`` (the caller feeds the wide output to a consumer that takes it packed)."""
    split = fused["split"]
    g.nodes.remove(split)
    g.inits[:] = [t for t in g.inits if t.name != split.input[1]]  # its sizes constant
    return fused["output"]
