"""Sibling ``MatMulNBits`` nodes (same input, same field and blocks) merged into one wide node.

Batch-1 decode in ONNX Runtime pays a fixed cost per kernel call (thread-pool dispatch, activation
quantization per call at ``accuracy_level`` 4): q/k/v and gate/up read the same activation, so one node with
their rows stacked does the same arithmetic in one call. ``MatMulNBits`` stores everything row-major by output
row (``B (N, blocks, blob)``, ``scales`` and ``zero_points`` per row, packed zero points padded per row), so
the merged initializers are the concatenations along ``N`` and the result is exact: each output row is computed
from its own bytes as before. The merged output is split back into the original output names, so nothing
downstream changes; the caller may instead feed the wide output to a consumer that takes it packed
(``GroupQueryAttention``'s packed QKV input).

lowbit's own ONNX Runtime kernels get the same treatment without stacking: ``VQLinears`` (``BinaryLinears``) takes
several VQ (BiLLM) linears of one input, each with its own tensors, and runs all their rows in one pass over the
thread pool; for the MLP it also applies the SiLU gate (:func:`fuse_lowbit_linears`).
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
    if any(a.get(k) != attrs[0].get(k) for a in attrs for k in _SAME) or len(nodes[0].input) > 4:
        return None  # (a 5th input, g_idx or bias, is not row-stacked here)
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


def merge_side_terms(g: GraphBuilder, fused: dict, name: str) -> int:
    """After :func:`fuse_matmulnbits`: the merged linears' float side terms, all of one kind and read from one
    tensor ``x``, become one term added before the ``Split`` (three nodes instead of three per linear; exact):

    * ``Gather(x, idx_i) @ W_i`` (BiLLM's fp16 outlier columns): one ``Gather`` of the union of the columns and
      one ``MatMul`` with the ``W_i`` side by side, zero where a linear has no such column;
    * ``(x @ A_i) @ B_i`` (low-rank branches: ApiQ, ReALLM): ``x @ [A_1 .. A_n]`` then a block-diagonal ``B``.

    Returns the bytes the zeros add (0 if nothing was merged)."""
    from onnx import helper, numpy_helper

    split = fused["split"]
    inits = {t.name: t for t in g.inits}
    producer = {o: n for n in g.nodes for o in n.output}
    consumers: dict = {}
    for n in g.nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def only_use(t):
        return len(consumers.get(t, [])) == 1

    def side(o):
        use = consumers.get(o, [])
        if len(use) != 1 or use[0].op_type != "Add":
            return None
        add = use[0]
        t = add.input[1] if add.input[0] == o else add.input[0]
        mm = producer.get(t)
        if mm is None or mm.op_type != "MatMul" or mm.input[1] not in inits or not only_use(t):
            return None
        first = producer.get(mm.input[0])
        if first is None or not only_use(mm.input[0]) or first.input[1] not in inits:
            return None
        w = numpy_helper.to_array(inits[mm.input[1]])
        if first.op_type == "Gather":
            if {a.name: helper.get_attribute_value(a) for a in first.attribute}.get("axis") != -1:
                return None
            return "gather", first.input[0], (add, mm, first), numpy_helper.to_array(inits[first.input[1]]), w
        if first.op_type == "MatMul":
            return "lowrank", first.input[0], (add, mm, first), numpy_helper.to_array(inits[first.input[1]]), w
        return None

    sides = [side(o) for o in split.output]
    found = [x for x in sides if x is not None]
    if len(found) < 2 or len({(x[0], x[1]) for x in found}) != 1:
        return 0
    kind, src = found[0][:2]
    total = sum(fused["sizes"])
    own = sum(x[4].nbytes for x in found)
    if kind == "gather":
        cols = sorted({int(c) for x in found for c in x[3]})
        row = {c: i for i, c in enumerate(cols)}
        w = np.zeros((len(cols), total), np.float32)
        off = 0
        for x, n in zip(sides, fused["sizes"]):
            if x is not None:
                w[[row[int(c)] for c in x[3]], off : off + n] = x[4]
            off += n
    else:
        a = np.concatenate([x[3] for x in found], axis=1)
        own += a.nbytes
        w = np.zeros((a.shape[1], total), np.float32)
        off, r0 = 0, 0
        for x, n in zip(sides, fused["sizes"]):
            if x is not None:
                r = x[3].shape[1]
                w[r0 : r0 + r, off : off + n] = x[4]
                r0 += r
            off += n
    dead, drop = set(), set()
    for i, x in enumerate(sides):
        if x is not None:
            add, mm, first = x[2]
            split.output[i] = add.output[0]
            dead |= {id(add), id(mm), id(first)}
            drop |= {first.input[1], mm.input[1]}
    g.nodes[:] = [n for n in g.nodes if id(n) not in dead]
    g.inits[:] = [t for t in g.inits if t.name not in drop]
    at = g.nodes.index(split)
    tail = g.nodes[at:]
    del g.nodes[at:]
    if kind == "gather":
        h = g.op("Gather", [src, g.const_i64(f"{name}.outlier_idx", cols)], name=f"{name}.outlier_gather", axis=-1)
        t = g.op("MatMul", [h, g.init(f"{name}.outliers.weight_t", w)], name=f"{name}.outliers")
    else:
        h = g.op("MatMul", [src, g.init(f"{name}.lora_a.weight_t", a)], name=f"{name}.lora_a")
        t = g.op("MatMul", [h, g.init(f"{name}.lora_b.weight_t", w)], name=f"{name}.lora_b")
    split.input[0] = g.op("Add", [split.input[0], t], name=f"{name}.{'outlier' if kind == 'gather' else 'lowrank'}_add")
    g.nodes.extend(tail)
    return int(w.nbytes + (a.nbytes if kind == "lowrank" else 0) - own)


def drop_split(g: GraphBuilder, fused: dict) -> str:
    """Remove a merge's ``Split`` (the caller feeds the wide output to a consumer that takes it packed)."""
    split = fused["split"]
    g.nodes.remove(split)
    g.inits[:] = [t for t in g.inits if t.name != split.input[1]]  # its sizes constant
    return split.input[0]


# each lowbit op's inputs after x, in order, and its per-linear attributes; in the multi-linear op an absent
# input becomes an empty tensor of its type
_LINEARS = {
    "VQMatMul": ("VQLinears", (np.uint8, np.float16, np.float16, np.int32, np.float16, np.float16, np.float32),
                 ("index_bits", "vec_dim", "group_size")),
    "BinaryMatMul": ("BinaryLinears", (np.uint8, np.uint8, np.float16, np.float16, np.int32, np.uint8, np.uint8,
                                       np.int32, np.float16, np.float32), ("block_size", "accuracy_level")),
}


def fuse_lowbit_linears(g: GraphBuilder, node_names: list[str], name: str, gated: bool = False) -> str | None:
    """Merge the ``lowbit.ort::VQMatMul`` (or ``BinaryMatMul``) nodes called ``node_names``, all reading one
    ``x``, into one ``lowbit.ort::VQLinears`` (``BinaryLinears``) node ``name``: each linear keeps its own tensors
    (formats may differ), the kernel runs all their rows in one pass over the thread pool; exact. Without
    ``gated`` the node has the merged nodes' outputs, so nothing downstream changes. With ``gated`` (two nodes:
    gate, up) it computes ``silu(gate) * up`` (the MLP's activation, replacing ``QuickGelu`` and ``Mul``) and the
    new output's name is returned; the caller rewires its consumer. Returns the node's (first) output, or ``None``
    (nothing changed) where a node is missing, the nodes are not all one such op of the same input, or (gated) an
    output already has a consumer."""
    from onnx import helper

    from lowbit.runtime.ort_ops import DOMAIN

    pos = {n.name: i for i, n in enumerate(g.nodes)}
    if len(node_names) < 2 or any(n not in pos for n in node_names) or (gated and len(node_names) != 2):
        return None
    nodes = [g.nodes[pos[n]] for n in node_names]
    op = nodes[0].op_type
    if op not in _LINEARS or any((n.op_type, n.domain) != (op, DOMAIN) or n.input[0] != nodes[0].input[0]
                                 for n in nodes):
        return None
    if gated and any(o in node.input for node in g.nodes for n in nodes for o in n.output):
        return None  # an output already has a consumer (a side term added to it): it must stay as it is
    fused_op, dtypes, attr_names = _LINEARS[op]
    empty = {}

    def placeholder(dtype):
        if dtype not in empty:
            empty[dtype] = g.init(f"{name}.empty_{np.dtype(dtype).name}", np.zeros(0, dtype))
        return empty[dtype]

    ins = [nodes[0].input[0]]
    for n in nodes:
        given = list(n.input[1:]) + [""] * (len(dtypes) - len(n.input) + 1)
        ins += [t if t else placeholder(dtype) for t, dtype in zip(given, dtypes)]
    attrs = [_attrs(n) for n in nodes]
    lists = {k: [int(a[k]) for a in attrs] for k in attr_names}
    outs = [g.name(f"{name}/out0")] if gated else [n.output[0] for n in nodes]
    first = min(pos[n] for n in node_names)
    fused = helper.make_node(fused_op, ins, outs, name=g.name(name), domain=DOMAIN,
                             activation="silu_mul" if gated else "none", **lists)
    for n in nodes:
        g.nodes.remove(n)
    g.nodes.insert(first, fused)
    return outs[0]
