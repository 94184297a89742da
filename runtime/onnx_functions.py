"""ONNX translations of the ``lowbit::*`` ops (onnxscript), used by :mod:`lowbit.compiler.lowering.onnx`.

* ``lowbit::matmul_nbits`` -> ``com.microsoft::MatMulNBits`` (one node; ``accuracy_level`` chosen at export).
* ``lowbit::affine_linear`` (1/3-bit, odd group sizes, symmetric 8-bit) -> ``lowbit.AffineLinear`` /
  ``lowbit.AffineLinearSym``.
* ``lowbit::affine_embedding`` (tied embedding of a packed head) -> ``com.microsoft::GatherBlockQuantized`` (4/8-bit,
  whole groups), else ``lowbit.AffineEmbedding``.
* ``lowbit::binary_linear`` (BiLLM) -> ``lowbit.BinaryLinear``.
* ``lowbit::vq_linear`` (ReALLM) -> ``lowbit.VQLinear`` (``Gather`` of codebook entries by index).

The ``lowbit`` domain ops are ONNX *functions* stored in the model: their bodies use only standard ops
(``BitShift``/``BitwiseAnd`` bit unpacking, ``Gather`` of per-group scales, ``ScatterElements`` for the
salient and outlier columns, ``MatMul``), so stock ONNX Runtime runs every exported model while the
packed bytes stay packed in the file. Bias and low-rank branches are plain ``Add``/``MatMul`` nodes
around the function call. onnxscript needs the source of these functions, hence this module file.
"""

from __future__ import annotations

import onnxscript
from onnxscript import opset18 as op

LOWBIT = onnxscript.values.Opset("lowbit", 1)
MSFT = onnxscript.values.Opset("com.microsoft", 1)


def _matmulnbits_schema():
    # ONNX itself has no schema for ORT's contrib op and onnxscript needs one to record a call, so it is
    # declared here (inputs and attributes as ONNX Runtime documents them).
    from onnx.defs import OpSchema

    P = OpSchema.FormalParameter
    opt = OpSchema.FormalParameterOption.Optional
    A = OpSchema.AttrType
    return OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[P("A", "T1"), P("B", "T2"), P("scales", "T1"), P("zero_points", "T3", param_option=opt),
                P("g_idx", "T4", param_option=opt), P("bias", "T1", param_option=opt)],
        outputs=[P("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], ""), ("T2", ["tensor(uint8)"], ""),
                          ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"], ""),
                          ("T4", ["tensor(int32)"], "")],
        attributes=[OpSchema.Attribute("K", A.INT, ""), OpSchema.Attribute("N", A.INT, ""),
                    OpSchema.Attribute("bits", A.INT, ""), OpSchema.Attribute("block_size", A.INT, ""),
                    OpSchema.Attribute("accuracy_level", A.INT, "")],
    )


MATMULNBITS = onnxscript.values.Op(MSFT, "MatMulNBits", _matmulnbits_schema())


def _gather_bq_schema():
    from onnx.defs import OpSchema

    P = OpSchema.FormalParameter
    A = OpSchema.AttrType
    return OpSchema(
        "GatherBlockQuantized", "com.microsoft", 1,
        inputs=[P("data", "T1"), P("indices", "Tind"), P("scales", "T2"),
                P("zero_points", "T1", param_option=OpSchema.FormalParameterOption.Optional)],
        outputs=[P("output", "T2")],
        type_constraints=[("T1", ["tensor(uint8)"], ""), ("Tind", ["tensor(int32)", "tensor(int64)"], ""),
                          ("T2", ["tensor(float)", "tensor(float16)"], "")],
        attributes=[OpSchema.Attribute(a, A.INT, "") for a in ("gather_axis", "quantize_axis", "block_size", "bits")],
    )


GATHER_BQ = onnxscript.values.Op(MSFT, "GatherBlockQuantized", _gather_bq_schema())


@onnxscript.script(LOWBIT, default_opset=op)
def UnpackBits(packed, bits: int, count: int):
    """uint8 ``(R, nbytes)`` rows of a low-bits-first bit stream -> float codes ``(R, count)``."""
    shifts = op.Cast(op.Range(0, 8, 1), to=2)
    planes = op.BitwiseAnd(op.BitShift(op.Unsqueeze(packed, [-1]), shifts, direction="RIGHT"), op.Cast(1, to=2))
    flat = op.Reshape(planes, [0, -1])
    nbits = op.Mul(op.Constant(value_int=bits), op.Constant(value_int=count))
    used = op.Slice(flat, [0], op.Reshape(nbits, [1]), [1])
    shape = op.Concat(op.Constant(value_ints=[0]), op.Reshape(op.Constant(value_int=count), [1]),
                      op.Reshape(op.Constant(value_int=bits), [1]), axis=0)
    b = op.Reshape(op.Cast(used, to=1), shape)
    place = op.Pow(op.Constant(value_float=2.0), op.Cast(op.Range(0, op.Constant(value_int=bits), 1), to=1))
    return op.ReduceSum(op.Mul(b, place), [-1], keepdims=0)


@onnxscript.script(LOWBIT, default_opset=op)
def GroupOfColumn(block: int, count: int):
    """int64 ``(count,)``: the group (block) index of each column."""
    return op.Div(op.Range(0, op.Constant(value_int=count), 1), op.Constant(value_int=block))


@onnxscript.script(LOWBIT, default_opset=op)
def AffineLinear(x, qweight, scales, zeros, bits: int, group_size: int, in_features: int, groups: int):
    """``x @ W.T`` for an :class:`~lowbit.runtime.formats.AffineIntK` weight with packed integer zeros."""
    codes = UnpackBits(qweight, bits=bits, count=in_features)
    z = UnpackBits(zeros, bits=bits, count=groups)
    grp = GroupOfColumn(block=group_size, count=in_features)
    s = op.Cast(op.Gather(scales, grp, axis=1), to=1)
    w = op.Mul(op.Sub(codes, op.Gather(z, grp, axis=1)), s)
    return op.MatMul(x, op.CastLike(op.Transpose(w, perm=[1, 0]), x))


@onnxscript.script(LOWBIT, default_opset=op)
def AffineLinearSym(x, qweight, scales, bits: int, group_size: int, in_features: int):
    """``x @ W.T`` for a symmetric :class:`~lowbit.runtime.formats.AffineIntK` weight (midpoint zero)."""
    codes = UnpackBits(qweight, bits=bits, count=in_features)
    two = op.Constant(value_float=2.0)
    mid = op.Div(op.Sub(op.Pow(two, op.Cast(op.Constant(value_int=bits), to=1)), op.Constant(value_float=1.0)), two)
    grp = GroupOfColumn(block=group_size, count=in_features)
    w = op.Mul(op.Sub(codes, mid), op.Cast(op.Gather(scales, grp, axis=1), to=1))
    return op.MatMul(x, op.CastLike(op.Transpose(w, perm=[1, 0]), x))


@onnxscript.script(LOWBIT, default_opset=op)
def AffineEmbedding(ids, qweight, scales, zeros, bits: int, group_size: int, in_features: int, groups: int):
    """Rows ``ids`` of an :class:`~lowbit.runtime.formats.AffineIntK` table (tied embedding of a packed head)
    when ``GatherBlockQuantized`` cannot hold it: gather the packed rows, then unpack only those."""
    flat = op.Reshape(ids, [-1])
    codes = UnpackBits(op.Gather(qweight, flat, axis=0), bits=bits, count=in_features)
    z = UnpackBits(op.Gather(zeros, flat, axis=0), bits=bits, count=groups)
    grp = GroupOfColumn(block=group_size, count=in_features)
    s = op.Cast(op.Gather(op.Gather(scales, flat, axis=0), grp, axis=1), to=1)
    rows = op.Mul(op.Sub(codes, op.Gather(z, grp, axis=1)), s)
    shape = op.Concat(op.Shape(ids), op.Reshape(op.Constant(value_int=in_features), [1]), axis=0)
    return op.Reshape(rows, shape)


@onnxscript.script(LOWBIT, default_opset=op)
def BinaryLinear(x, signs, residual_signs, salient_cols, group, alphas, mus, outlier_cols, outlier_vals,
                 block_size: int, in_features: int, num_salient: int, num_nonsalient: int):
    """``x @ W.T`` for a BiLLM :class:`~lowbit.runtime.formats.BinaryResidual` weight.

    ``mus`` is all zeros for the paper variant; ``outlier_cols``/``outlier_vals`` may be empty.
    """
    one = op.Constant(value_float=1.0)
    two = op.Constant(value_float=2.0)
    s = op.Sub(op.Mul(UnpackBits(signs, bits=1, count=in_features), two), one)  # (N, K) +-1
    n_rows = op.Slice(op.Shape(signs), [0], [1])
    k_vec = op.Reshape(op.Constant(value_int=in_features), [1])
    sal = op.Cast(salient_cols, to=7)
    # non-salient column indices, increasing: complement of the salient set
    ones_k = op.ConstantOfShape(k_vec, value=onnxscript.ir.tensor([1], dtype=onnxscript.ir.DataType.INT64))
    keep = op.ScatterElements(ones_k, sal, op.Expand(op.Constant(value_int=0), op.Shape(sal)), axis=0)
    non_sal = op.Reshape(op.NonZero(keep), [-1])
    n_ns = op.Shape(non_sal)
    # group bitmap (over non-salient columns) scattered to full width: 1 = sparse part
    g = UnpackBits(group, bits=1, count=num_nonsalient)
    idx_ns = op.Expand(op.Unsqueeze(non_sal, [0]), op.Concat(n_rows, n_ns, axis=0))
    zeros_nk = op.ConstantOfShape(op.Concat(n_rows, k_vec, axis=0))
    sparse = op.Cast(op.ScatterElements(zeros_nk, idx_ns, g, axis=1), to=9)
    blk = GroupOfColumn(block=block_size, count=in_features)
    a = op.Cast(alphas, to=1)
    m = op.Cast(mus, to=1)
    a_c = op.Gather(op.Gather(a, 2, axis=2), blk, axis=1)
    a_s = op.Gather(op.Gather(a, 3, axis=2), blk, axis=1)
    m_c = op.Gather(op.Gather(m, 2, axis=2), blk, axis=1)
    m_s = op.Gather(op.Gather(m, 3, axis=2), blk, axis=1)
    w = op.Add(op.Mul(op.Where(sparse, a_s, a_c), s), op.Where(sparse, m_s, m_c))
    # salient columns: alpha0*s + mu0 + alpha1*r + mu1
    r = op.Sub(op.Mul(UnpackBits(residual_signs, bits=1, count=num_salient), two), one)
    sblk = op.Gather(blk, sal, axis=0)
    a0 = op.Gather(op.Gather(a, 0, axis=2), sblk, axis=1)
    a1 = op.Gather(op.Gather(a, 1, axis=2), sblk, axis=1)
    m01 = op.Gather(op.Add(op.Gather(m, 0, axis=2), op.Gather(m, 1, axis=2)), sblk, axis=1)
    ws = op.Add(op.Add(op.Mul(a0, op.Gather(s, sal, axis=1)), op.Mul(a1, r)), m01)
    idx_s = op.Expand(op.Unsqueeze(sal, [0]), op.Concat(n_rows, op.Shape(sal), axis=0))
    w = op.ScatterElements(w, idx_s, ws, axis=1)
    # fp16 outlier columns
    oc = op.Cast(outlier_cols, to=7)
    idx_o = op.Expand(op.Unsqueeze(oc, [0]), op.Concat(n_rows, op.Shape(oc), axis=0))
    w = op.ScatterElements(w, idx_o, op.Cast(outlier_vals, to=1), axis=1)
    return op.MatMul(x, op.CastLike(op.Transpose(w, perm=[1, 0]), x))


@onnxscript.script(LOWBIT, default_opset=op)
def VQLinear(x, codes, codebook, scales, perm, index_bits: int, num_vectors: int, group_size: int, in_features: int):
    """``x @ W.T`` for a :class:`~lowbit.runtime.formats.VQCodebook` weight: the codebook entries are
    gathered by index (``Gather``), scaled per group, and the input columns are permuted instead of the
    weight's (``x[..., perm] @ Wp.T``, the same product)."""
    idx = op.Cast(UnpackBits(codes, bits=index_bits, count=num_vectors), to=7)  # (N, K/d) int64
    vecs = op.Gather(op.Cast(codebook, to=1), idx, axis=0)  # (N, K/d, d)
    wp = op.Reshape(vecs, [0, -1])  # (N, K), stored column order
    grp = GroupOfColumn(block=group_size, count=in_features)
    wp = op.Mul(wp, op.Cast(op.Gather(scales, grp, axis=1), to=1))
    xp = op.Gather(x, op.Cast(perm, to=7), axis=-1)
    return op.MatMul(xp, op.CastLike(op.Transpose(wp, perm=[1, 0]), x))


# -- call sites ------------------------------------------------------------------------------------
# torch.onnx.export runs a version converter that inlines every function in the model, which would
# dissolve the lowbit ops into hundreds of anonymous nodes. So translations record *calls* (nodes in the
# lowbit domain, declared with a schema like any custom op), and :func:`attach_functions` adds the
# definitions above to the saved model. ONNX Runtime inlines them when it loads the model.

_ANY = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(uint8)", "tensor(int32)", "tensor(int64)"]
FUNCTIONS = (UnpackBits, GroupOfColumn, AffineLinear, AffineLinearSym, AffineEmbedding, BinaryLinear, VQLinear)


def _call_site(fn) -> onnxscript.values.Op:
    from onnx.defs import OpSchema

    proto = fn.to_function_proto()
    P = OpSchema.FormalParameter
    schema = OpSchema(
        proto.name, proto.domain, 1,
        inputs=[P(name, f"T{i}") for i, name in enumerate(proto.input)],
        outputs=[P("Y", "TY")],
        type_constraints=[(f"T{i}", _ANY, "") for i in range(len(proto.input))] + [("TY", _ANY, "")],
        attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "") for a in proto.attribute],
    )
    return onnxscript.values.Op(LOWBIT, proto.name, schema)


AFFINE_CALL = _call_site(AffineLinear)
AFFINE_SYM_CALL = _call_site(AffineLinearSym)
EMBED_CALL = _call_site(AffineEmbedding)
BINARY_CALL = _call_site(BinaryLinear)
VQ_CALL = _call_site(VQLinear)


def attach_functions(model):
    """Add the ``lowbit`` function definitions a model calls (and the opset import)."""
    used = {n.op_type for n in model.graph.node if n.domain == LOWBIT.domain}
    if not used:
        return model
    have = {(f.domain, f.name) for f in model.functions}
    for fn in FUNCTIONS:
        proto = fn.to_function_proto()
        if (proto.domain, proto.name) not in have:
            model.functions.append(proto)
    if not any(o.domain == LOWBIT.domain for o in model.opset_import):
        model.opset_import.append(__import__("onnx").helper.make_opsetid(LOWBIT.domain, 1))
    return model


# -- translations (traced Python, called by the exporter with ONNX values and Python attributes) ------


def _add_bias(y, bias):
    return y if bias is None else op.Add(y, op.CastLike(bias, y))


def _add_lowrank(y, x, lora_a, lora_b):
    if lora_a is None:
        return y
    la = op.CastLike(op.Transpose(lora_a, perm=[1, 0]), x)
    lb = op.CastLike(op.Transpose(lora_b, perm=[1, 0]), x)
    return op.Add(y, op.MatMul(op.MatMul(x, la), lb))


def translation_table(accuracy_level: int = 4) -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``; ``accuracy_level`` goes to MatMulNBits."""
    import torch

    from . import ops  # noqa: F401  (registers the torch ops)

    def matmul_nbits(x, b, scales, zero_points, bias, k, n, bits, block_size):
        return MATMULNBITS(x, b, scales, zero_points, None, bias, K=k, N=n, bits=bits, block_size=block_size,
                           accuracy_level=accuracy_level)

    def affine_linear(x, qweight, scales, zeros, bias, lora_a, lora_b, bits, group_size, in_features):
        groups = -(-in_features // group_size)
        if zeros is None:
            y = AFFINE_SYM_CALL(x, qweight, scales, bits=bits, group_size=group_size, in_features=in_features)
        else:
            y = AFFINE_CALL(x, qweight, scales, zeros, bits=bits, group_size=group_size,
                            in_features=in_features, groups=groups)
        return _add_bias(_add_lowrank(y, x, lora_a, lora_b), bias)

    def affine_embedding(ids, qweight, scales, zeros, bits, group_size, in_features):
        groups = -(-in_features // group_size)
        if bits in (4, 8) and group_size >= 16 and not group_size & (group_size - 1) and in_features % group_size == 0:
            # 4- and 8-bit rows with whole groups are already ORT's packed layout (codes and zero points)
            return GATHER_BQ(qweight, ids, op.Cast(scales, to=1), zeros, gather_axis=0, quantize_axis=1,
                             block_size=group_size, bits=bits)
        return EMBED_CALL(ids, qweight, scales, zeros, bits=bits, group_size=group_size, in_features=in_features,
                          groups=groups)

    def binary_linear(x, signs, residual_signs, salient_cols, group, alphas, mus, outlier_cols, outlier_vals,
                      bias, block_size, in_features):
        if mus is None:
            mus = op.ConstantOfShape(op.Shape(alphas))
        if outlier_cols is None:
            outlier_cols = op.Slice(salient_cols, [0], [0])  # empty (0,)
            outlier_vals = op.Slice(op.Reshape(alphas, [0, -1]), [0], [0], [1])  # empty (N, 0)
        num_salient = int(salient_cols.shape[0])
        y = BINARY_CALL(x, signs, residual_signs, salient_cols, group, alphas, mus, outlier_cols, outlier_vals,
                        block_size=block_size, in_features=in_features, num_salient=num_salient,
                         num_nonsalient=in_features - num_salient)
        return _add_bias(y, bias)

    def vq_linear(x, codes, codebook, scales, perm, bias, lora_a, lora_b, index_bits, vec_dim, group_size,
                  in_features):
        if perm is None:
            perm = op.Range(0, in_features, 1)
        y = VQ_CALL(x, codes, codebook, scales, perm, index_bits=index_bits, num_vectors=in_features // vec_dim,
                    group_size=group_size, in_features=in_features)
        return _add_bias(_add_lowrank(y, x, lora_a, lora_b), bias)

    return {torch.ops.lowbit.matmul_nbits.default: matmul_nbits,
            torch.ops.lowbit.affine_linear.default: affine_linear,
            torch.ops.lowbit.binary_linear.default: binary_linear,
            torch.ops.lowbit.vq_linear.default: vq_linear,
            torch.ops.lowbit.affine_embedding.default: affine_embedding}
