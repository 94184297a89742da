"""``to-matmulnbits``: repack uniform weights into ONNX Runtime's ``MatMulNBits`` layout (a graph pass).

Every ``lowbit::affine_linear`` node that ``MatMulNBits`` can hold becomes ``lowbit::matmul_nbits``
(see :mod:`lowbit.runtime.ops`) with its weight repacked explicitly: codes regrouped into
``(N, k_blocks, block_size*bits/8)`` blobs with the ragged last block zero-padded, scales in the
activation dtype, integer zero points packed per row as ORT reads them. A low-rank branch stays as two
plain matmuls added to the output. What it cannot hold is left to the ``lowbit`` ONNX functions, with
the reason in the report:

* ``group_size`` not a power of two >= 16 (``block_size`` must be);
* symmetric (half-integer midpoint) 5- to 8-bit: ORT takes float zero points only for 2 and 4 bits.

Widths ORT has no kernel for are held exactly in the next one it has (:func:`ort_bits`: 1 -> 2, 3 -> 4,
5..7 -> 8): a ``b``-bit code ``c`` with zero point ``z`` is the same integer in a wider field, so
``(c - z) * s`` is unchanged, bit for bit; the weight reads ``ort_bits(b) / b`` times the bytes of the
artifact's codes (3-bit: 4/3) instead of being folded into a float matrix by ORT at load.

The result still runs in torch (the op has an eager reference), so equivalence is checked before
translation.

Activation outliers (``outlier_channels``, from :func:`activation_outliers`): ``MatMulNBits`` at
``accuracy_level`` 4 quantizes each block of activations to int8, and one massive channel (SmolLM2's
residual stream has channels ~1000x the others) ruins the other values of its block. For the layers given,
those input channels are taken out of the int8 path: the node reads ``x`` with them zeroed, and a thin float
matmul ``x[..., idx] @ W[:, idx].T`` (the few dequantized columns, exact in float32) adds them back
(LLM.int8()-style decomposition).
"""

from __future__ import annotations

import torch

from lowbit.runtime import ops as _ops  # noqa: F401  (registers torch.ops.lowbit.*)
from lowbit.runtime.packing import pack_rows, unpack_rows

from .base import PassContext, PassReport

MATMULNBITS_BITS = (2, 4, 8)


def ort_bits(bits: int) -> int:
    """The ``MatMulNBits`` width that holds ``bits``-bit codes exactly (1 -> 2, 3 -> 4, 5..7 -> 8)."""
    return next(b for b in MATMULNBITS_BITS if b >= bits)


def why_not_matmulnbits(bits: int, group_size: int, symmetric: bool) -> str | None:
    """The reason an affine weight cannot be a ``MatMulNBits`` node, or ``None`` if it can."""
    if not 1 <= bits <= 8:
        return f"{bits}-bit: MatMulNBits holds 1 to 8 bits"
    if group_size < 16 or group_size & (group_size - 1):
        return f"group size {group_size}: MatMulNBits needs a power of two >= 16"
    if symmetric and ort_bits(bits) == 8:
        return f"symmetric {bits}-bit: held as 8-bit, and ORT takes float zero points only for 2 and 4 bits"
    return None


def doubled_symmetric(qweight, scales, bits: int, group_size: int, in_features: int):
    """A symmetric ``bits``-bit weight as integer codes of ``bits + 1`` bits: ``(c - (2**b-1)/2) * s ==
    (2c - (2**b-1)) * s/2``, zero point ``2**b - 1``. Exact. ONNX Runtime 1.32 runs ``MatMulNBits`` with float
    zero points (the symmetric midpoint) on a scalar path ~100x slower (one 8192 x 8192 node: 490 ms against 5 ms);
    the doubled codes are free where the field has room (1, 3, 5-7 bits) and twice the bytes at 2 and 4 bits.
    Returns ``(qweight, scales, zeros, bits + 1)`` packed as the artifact packs them."""
    n = scales.shape[0]
    codes = unpack_rows(qweight, bits, in_features).to(torch.int32) * 2
    zeros = torch.full((n, scales.shape[1]), (1 << bits) - 1, dtype=torch.uint8)
    return (pack_rows(codes.to(torch.uint8), bits + 1), (scales.float() / 2).to(scales.dtype),
            pack_rows(zeros, bits + 1), bits + 1)


def repack_for_matmulnbits(qweight, scales, zeros, bits: int, group_size: int, in_features: int,
                           dtype: torch.dtype = torch.float32, block_size: int | None = None):
    """Our per-row bit stream -> ``(b, scales, zero_points)`` in ``MatMulNBits`` layout.

    ``block_size`` (a divisor of ``group_size``, default the group size): ORT blocks smaller than our groups,
    each repeating its group's scale and zero point (exactly the same weights; at ``accuracy_level`` 4 ORT
    quantizes activations per block, so smaller blocks keep more activation precision)."""
    n, g = scales.shape
    blk = block_size or group_size
    if group_size % blk:
        raise ValueError(f"block size {blk} must divide the group size {group_size}")
    rep = group_size // blk
    kb = -(-in_features // blk)
    ob = ort_bits(bits)  # the codes and zero points keep their integer values in the wider field
    codes = unpack_rows(qweight, bits, in_features)
    padded = torch.zeros(n, kb * blk, dtype=torch.uint8)
    padded[:, :in_features] = codes
    b = pack_rows(padded.view(n * kb, blk), ob).view(n, kb, blk * ob // 8)
    sc = scales.repeat_interleave(rep, dim=1)[:, :kb]
    if zeros is None:  # symmetric: the midpoint (2**bits - 1) / 2 of the artifact's own width, as float zero points
        zp = torch.full((n, kb), ((1 << bits) - 1) / 2.0, dtype=dtype)
    else:  # packed per row, low bits first: ORT's layout
        zp = pack_rows(unpack_rows(zeros, bits, g).repeat_interleave(rep, dim=1)[:, :kb], ob)
    return b.contiguous(), sc.to(dtype).contiguous(), zp.contiguous()


class ToMatMulNBits:
    name = "to-matmulnbits"

    def __init__(self, dtype: torch.dtype = torch.float32, outlier_channels: dict | None = None,
                 max_block: int | None = None):
        self.dtype = dtype
        self.max_block = max_block  # ORT block = min(group size, max_block) (see repack_for_matmulnbits)
        self.outlier_channels = outlier_channels or {}  # qweight attribute name -> LongTensor of input channels

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassReport:
        rep = PassReport(self.name)
        target = torch.ops.lowbit.affine_linear.default
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target != target:
                continue
            x, qw, sc, zr, bias, la, lb, bits, gs, k = node.args
            label = node.meta.get("lowbit_module", node.name)
            get = lambda a: None if a is None else _fetch(gm, a)  # noqa: E731
            qw_t, sc_t, zr_t, nbits = get(qw), get(sc), get(zr), bits
            if zr is None and bits < 8:  # symmetric: doubled integer codes (see doubled_symmetric)
                qw_t, sc_t, zr_t, nbits = doubled_symmetric(qw_t, sc_t, bits, gs, k)
            why = why_not_matmulnbits(nbits, gs, zr_t is None)
            if why:
                rep.skipped.append((label, why + "; kept as lowbit.AffineLinear"))
                continue
            blk = gs if not self.max_block else min(gs, self.max_block)
            b, scales, zp = repack_for_matmulnbits(qw_t, sc_t, zr_t, nbits, gs, k, self.dtype, blk)
            n = scales.shape[0]
            base = qw.target.rsplit("__", 1)[0]
            names = {}
            for suffix, t in (("nbits_b", b), ("nbits_scales", scales), ("nbits_zp", zp)):
                names[suffix] = f"{base}__{suffix}"
                gm.register_buffer(names[suffix], t)
            if la is not None:  # the low-rank factors in the graph's float dtype (stored fp16; MatMul needs one type)
                for suffix, a in (("lora_a", la), ("lora_b", lb)):
                    names[suffix] = f"{base}__{suffix}_{str(self.dtype).split('.')[-1]}"
                    gm.register_buffer(names[suffix], get(a).to(self.dtype).contiguous())
            idx = self.outlier_channels.get(qw.target)
            if idx is not None and len(idx):
                from lowbit.runtime.formats import dequantize_affine

                w_cols = dequantize_affine(get(qw), get(sc), get(zr), bits, gs, k)[:, idx]
                keep = torch.ones(k)
                keep[idx] = 0.0
                for suffix, t in (("act_keep", keep.to(self.dtype)), ("act_idx", idx.to(torch.int64)),
                                  ("act_cols", w_cols.to(self.dtype).contiguous())):
                    names[suffix] = f"{base}__{suffix}"
                    gm.register_buffer(names[suffix], t)
                rep.changed["activation outlier splits"] = rep.changed.get("activation outlier splits", 0) + 1
            with gm.graph.inserting_before(node):
                x_in = x
                if "act_idx" in names:
                    x_in = gm.graph.call_function(torch.ops.aten.mul.Tensor, (x, gm.graph.get_attr(names["act_keep"])))
                args = [x_in] + [gm.graph.get_attr(names[s]) for s in ("nbits_b", "nbits_scales", "nbits_zp")]
                new = gm.graph.call_function(torch.ops.lowbit.matmul_nbits.default,
                                             (*args, bias, k, n, ort_bits(nbits), blk))
                out = new
                if "act_idx" in names:  # the outlier channels, in float: x[..., idx] @ W[:, idx].T
                    xo = gm.graph.call_function(torch.ops.aten.index_select.default,
                                                (x, -1, gm.graph.get_attr(names["act_idx"])))
                    t = gm.graph.call_function(torch.ops.aten.linear.default, (xo, gm.graph.get_attr(names["act_cols"])))
                    out = gm.graph.call_function(torch.ops.aten.add.Tensor, (out, t))
                if la is not None:  # low-rank branch: two thin plain matmuls added to the output
                    t = gm.graph.call_function(torch.ops.aten.linear.default, (x, gm.graph.get_attr(names["lora_a"])))
                    t = gm.graph.call_function(torch.ops.aten.linear.default, (t, gm.graph.get_attr(names["lora_b"])))
                    out = gm.graph.call_function(torch.ops.aten.add.Tensor, (out, t))
            new.meta.update({kk: v for kk, v in node.meta.items() if kk in ("nn_module_stack", "val", "lowbit_module")})
            node.replace_all_uses_with(out)
            gm.graph.erase_node(node)
            key = f"matmulnbits:{bits}bit" + (" symmetric, codes doubled" if nbits != bits else "") \
                + (f" as {ort_bits(nbits)}bit" if ort_bits(nbits) != bits else "")
            rep.changed[key] = rep.changed.get(key, 0) + 1
        gm.graph.eliminate_dead_code()
        _drop_unused_buffers(gm)
        gm.recompile()
        return rep


def activation_outliers(gm, batches, ratio: float = 20.0, max_channels: int = 8) -> dict:
    """Input channels of each compressed linear whose peak |activation| over ``batches`` (token ids) exceeds
    ``ratio`` x the median channel peak: ``{first packed tensor's attribute name: LongTensor}`` (at most
    ``max_channels``; :func:`module_of_attribute` turns the key into the module name)."""
    ops = torch.ops.lowbit
    targets = {ops.affine_linear.default, ops.binary_linear.default, ops.vq_linear.default}
    peaks: dict = {}

    class Probe(torch.fx.Interpreter):
        def run_node(self, n):
            if n.op == "call_function" and n.target in targets:
                x = self.env[n.args[0]]
                p = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
                key = n.args[1].target  # the qweight attribute: the same name in every graph of an artifact
                peaks[key] = p if key not in peaks else torch.maximum(peaks[key], p)
            return super().run_node(n)

    with torch.no_grad():
        for ids in batches:
            Probe(gm).run(ids)
    out = {}
    for name, p in peaks.items():
        med = p.median().clamp(min=1e-12)
        cand = torch.nonzero(p > ratio * med).flatten()
        if cand.numel():
            out[name] = cand[torch.argsort(p[cand], descending=True)[:max_channels]].sort().values
    return out


def module_of_attribute(name: str) -> str:
    """``lowbit__model__layers__1__mlp__down_proj__qweight`` -> ``model.layers.1.mlp.down_proj``."""
    base = name.rsplit("__", 1)[0]
    return base[len("lowbit__"):].replace("__", ".") if base.startswith("lowbit__") else base.replace("__", ".")


def _fetch(gm, node) -> torch.Tensor:
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def _drop_unused_buffers(gm) -> None:
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_buffers()):
        if "." not in name and name not in used and "__" in name:
            delattr(gm, name)
