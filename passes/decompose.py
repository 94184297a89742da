"""``decompose-lowbit``: replace every ``lowbit::*`` op by integer unpacking plus a matmul (standard aten ops).

For lowerings whose toolchains know nothing of the lowbit ops (MLIR through torch-mlir). The packed
tensors stay the graph's constants (uint8 codes, fp16 scales); what the pass adds is the arithmetic that
dequantizes them inside the graph, written with ops every torch-mlir backend lowers (bitwise shift/and on
int32, ``index_select`` gathers, ``where``, float multiply-add, ``linear``):

* codes: ``uint8 (R, B)`` -> int32, broadcast against shifts 0..7, ``& 1`` -> bit planes ``(R, 8B)``, the first
  ``count*bits`` planes regrouped ``(R, count, bits)`` and summed with weights ``2**i``;
* per-column group / block indices come from ``arange // group``; for BiLLM each column's kind and its
  position among the columns of its kind are computed here from the real tensors and added as two small
  constants (int8 + int16, 3 bytes per input column), so the graph needs no ``nonzero``/``cumsum``/scatter.

The rewritten module computes exactly the eager reference's weights (tested).
"""

from __future__ import annotations

import torch

from lowbit.runtime import ops as _ops  # noqa: F401  (registers torch.ops.lowbit.*)

from .base import PassContext, PassReport
from .ort_layout import _fetch


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """float ``(R, count)`` codes of a low-bits-first packed ``uint8 (R, B)`` matrix (aten ops only)."""
    r, b = packed.shape
    p = packed.to(torch.int32).unsqueeze(-1).expand(r, b, 8)
    shifts = torch.arange(8, dtype=torch.int32).expand(r, b, 8)
    planes = torch.bitwise_and(torch.bitwise_right_shift(p, shifts), 1).reshape(r, b * 8)[:, : count * bits]
    place = torch.tensor([float(1 << i) for i in range(bits)])
    return (planes.reshape(r, count, bits).to(torch.float32) * place).sum(-1)


def affine_linear_decomposed(x, qweight, scales, zeros, bias, lora_a, lora_b, bits: int, group_size: int,
                             in_features: int):
    n, g = scales.shape
    codes = unpack_codes(qweight, bits, in_features)
    col_group = torch.arange(in_features) // group_size
    s = torch.index_select(scales.to(torch.float32), 1, col_group)
    if zeros is None:
        w = (codes - ((1 << bits) - 1) / 2.0) * s
    else:
        z = torch.index_select(unpack_codes(zeros, bits, g), 1, col_group)
        w = (codes - z) * s
    if lora_a is not None:
        w = w + lora_b.to(torch.float32) @ lora_a.to(torch.float32)
    return torch.nn.functional.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def affine_embedding_decomposed(ids, qweight, scales, zeros, bits: int, group_size: int, in_features: int):
    flat = ids.reshape(-1)
    n, g = scales.shape
    codes = unpack_codes(torch.index_select(qweight, 0, flat), bits, in_features)
    col_group = torch.arange(in_features) // group_size
    s = torch.index_select(torch.index_select(scales, 0, flat).to(torch.float32), 1, col_group)
    if zeros is None:
        w = (codes - ((1 << bits) - 1) / 2.0) * s
    else:
        w = (codes - torch.index_select(unpack_codes(torch.index_select(zeros, 0, flat), bits, g), 1, col_group)) * s
    return w.reshape(*ids.shape, in_features)


def binary_linear_decomposed(x, signs, residual_signs, group, alphas, mus, outlier_vals, col_kind, col_pos,
                             block_size: int, in_features: int, num_salient: int):
    k = in_features
    col_kind = col_kind.to(torch.int32)
    col_pos = col_pos.to(torch.int64)
    col_block = torch.arange(k) // block_size
    s = unpack_codes(signs, 1, k) * 2.0 - 1.0
    n_ns = k - num_salient
    # col_pos is each column's position among the columns of its own kind; clamped so every gather is in range
    sparse = torch.index_select(unpack_codes(group, 1, n_ns), 1, col_pos.clamp(max=max(n_ns - 1, 0))) > 0.5
    a = torch.index_select(alphas.to(torch.float32), 1, col_block)  # (N, K, 4)
    w = torch.where(sparse, a[..., 3], a[..., 2]) * s
    if mus is not None:
        m = torch.index_select(mus.to(torch.float32), 1, col_block)
        w = w + torch.where(sparse, m[..., 3], m[..., 2])
    if num_salient:
        r = torch.index_select(unpack_codes(residual_signs, 1, num_salient), 1,
                               col_pos.clamp(max=num_salient - 1)) * 2.0 - 1.0
        ws = a[..., 0] * s + a[..., 1] * r
        if mus is not None:
            ws = ws + m[..., 0] + m[..., 1]
        w = torch.where(col_kind == 1, ws, w)
    if outlier_vals is not None:
        ov = outlier_vals.to(torch.float32)
        w = torch.where(col_kind == 2, torch.index_select(ov, 1, col_pos.clamp(max=ov.shape[1] - 1)), w)
    return torch.nn.functional.linear(x, w.to(x.dtype))


def vq_linear_decomposed(x, codes, codebook, scales, perm, bias, lora_a, lora_b, index_bits: int, vec_dim: int,
                         group_size: int, in_features: int):
    n = scales.shape[0]
    idx = unpack_codes(codes, index_bits, in_features // vec_dim).to(torch.int64)
    wp = torch.index_select(codebook.to(torch.float32), 0, idx.reshape(-1)).reshape(n, in_features)
    wp = wp * torch.index_select(scales.to(torch.float32), 1, torch.arange(in_features) // group_size)
    # permute the input columns rather than scatter the weight's columns back
    xp = x if perm is None else torch.index_select(x, x.dim() - 1, perm.to(torch.int64))
    y = torch.nn.functional.linear(xp, wp.to(x.dtype), None if bias is None else bias.to(x.dtype))
    if lora_a is not None:
        y = y + torch.nn.functional.linear(torch.nn.functional.linear(x, lora_a.to(x.dtype)), lora_b.to(x.dtype))
    return y


def _column_maps(k, salient_cols, outlier_cols):
    """int8 kind (0 plain, 1 salient, 2 fp16 outlier) and each column's position among its own kind
    (int16 where it fits): 3 bytes per column, the only constants the decomposition adds."""
    sal = salient_cols.long()
    kind = torch.zeros(k, dtype=torch.int8)
    kind[sal] = 1
    if outlier_cols is not None:
        kind[outlier_cols.long()] = 2
    pos = torch.zeros(k, dtype=torch.int64)
    for c in (0, 1, 2):
        m = kind == c
        pos[m] = torch.arange(int(m.sum()))
    # non-salient positions count outlier columns too (the group bitmap covers every non-salient column)
    ns = kind != 1
    pos[kind == 0] = (torch.cumsum(ns.to(torch.int64), 0) - 1)[kind == 0]
    return kind, pos.to(torch.int16 if k < 32768 else torch.int32)


class DecomposeLowbitOps:
    name = "decompose-lowbit"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassReport:
        rep = PassReport(self.name)
        aff, binr = torch.ops.lowbit.affine_linear.default, torch.ops.lowbit.binary_linear.default
        vq = torch.ops.lowbit.vq_linear.default
        emb = torch.ops.lowbit.affine_embedding.default
        for i, node in enumerate(list(gm.graph.nodes)):
            if node.op == "call_function" and node.target == emb:
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_function(affine_embedding_decomposed, tuple(node.args))
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
                rep.changed["affine_embedding"] = rep.changed.get("affine_embedding", 0) + 1
                continue
            if node.op != "call_function" or node.target not in (aff, binr, vq):
                continue

            def const(name, t):
                attr = f"lowbit_decomp_{i}_{name}"
                gm.register_buffer(attr, t)
                return gm.graph.get_attr(attr)

            with gm.graph.inserting_before(node):
                if node.target == vq:
                    new = gm.graph.call_function(vq_linear_decomposed, tuple(node.args))
                    key = f"vq_codebook:{node.args[8]}bit"
                elif node.target == aff:
                    x, qw, sc, zr, bias, la, lb, bits, gs, k = node.args
                    new = gm.graph.call_function(affine_linear_decomposed, (x, qw, sc, zr, bias, la, lb, bits, gs, k))
                    key = f"affine_int:{bits}bit"
                else:
                    x, sg, rs, sal, grp, al, mu, oc, ov, bias, block, k = node.args
                    kind, pos = _column_maps(k, _fetch(gm, sal), None if oc is None else _fetch(gm, oc))
                    ns = _fetch(gm, sal).numel()
                    new = gm.graph.call_function(binary_linear_decomposed,
                                                 (x, sg, rs, grp, al, mu, ov, const("kind", kind), const("pos", pos),
                                                  block, k, ns))
                    if bias is not None:
                        new = gm.graph.call_function(torch.ops.aten.add.Tensor, (new, bias))
                    key = "binary_residual"
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            rep.changed[key] = rep.changed.get(key, 0) + 1
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return rep
