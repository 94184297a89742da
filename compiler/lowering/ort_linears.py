"""Each packed format as ONNX Runtime nodes that read packed bytes at run time (no float weight at load).

:func:`lower_linear` emits ``y = x @ W.T (+ bias)`` for one linear into a
:class:`~lowbit.compiler.lowering.onnx_graph.GraphBuilder` and returns a record of how (``lowering``), what it
keeps resident (``ort_bytes``), the artifact's own packed bytes (``packed_bytes``) and the weight error of the
lowering against the format's own dequantization (``rel_err``: 0 where exact).

* ``AffineIntK`` -> one ``com.microsoft::MatMulNBits`` (1 -> 2, 3 -> 4, 5..7 -> 8 bits, codes unchanged;
  symmetric codes doubled with the integer zero point ``2**b - 1`` and half the scale: free at 1/3/5..7 bits,
  twice the bytes at 2/4 bits (the next field; ORT's float zero points run ~100x slower): exact).
* ``BinaryResidual`` (BiLLM), ``binary="grid"`` (default): its levels (per row-block ``+-alpha_c``, ``+-alpha_s``
  and the salient sums) rounded onto an 8-bit grid (``grid_bits``; or 4-bit) per BiLLM block, one
  ``MatMulNBits`` (the relative weight error is recorded: ~7.5% per layer on SmolLM2 at 4 bits, against BiLLM's
  own ~50%; ~4.3 bits read per weight at 4 bits for BiLLM's ~2.6 stored, ~8.3 at 8); fp16 outlier columns
  stay exact in a thin float ``MatMul``. ``binary="exact"``: a weight of the concentrated part is
  ``alpha_c * s``, of the sparse part ``alpha_s * s``, so each part is one ternary plane
  ``{-1, 0, +1}`` times its per-row-block ``alpha`` (codes ``1 + s`` inside the part, ``1`` = zero elsewhere,
  zero point 1), both planes side by side in one 2-bit ``MatMulNBits`` that reads ``[x, x]``; the salient
  columns are gathered twice and take two more planes (``alpha0 * s``, ``alpha1 * r``) in a second node, each
  block's columns padded to 32 so blocks keep their own ``alpha``. Exact, but ~2.5x the format's bytes and
  slower (ORT's 2-bit kernels). The mean-shifted variant (``mus``) always takes the grid.
* ``VQCodebook`` (ReALLM) -> the codebook values times group scales are not on any uniform grid: they are
  rounded onto an 8-bit grid (``grid_bits``; or 4-bit) per block (the format's scale group when it is a power
  of two of 16-128 columns, else ``vq_block``; range shrink chosen for least squared error) and run as
  ``MatMulNBits`` after a ``Gather`` of ``x`` by the column permutation; the relative weight error is measured and
  recorded. Its low-rank term is folded into the weight before the grid by default (``vq_lowrank="fold"``: no
  ``MatMul`` pair; at SmolLM2's shapes the mean grid error moved from 0.095 to 0.096), or kept exact.
  With ``kernels="lowbit"`` it is instead one ``lowbit.ort::VQMatMul`` node that reads the packed codes, codebook,
  scales, permutation and low-rank factors as stored (exact; lowbit's own ONNX Runtime library,
  :mod:`lowbit.runtime.ort_ops`, must be registered to run it); BiLLM likewise one ``lowbit.ort::BinaryMatMul``
  over its planes (the group plane spread over all columns), exact.
* ``LowRank`` (affine formats: ApiQ) -> two thin float ``MatMul`` nodes added to the output.
* no format (a linear kept float) -> ``MatMul`` with the transposed float weight.
"""

from __future__ import annotations

import numpy as np
import torch

from lowbit.passes.ort_layout import ort_bits, repack_for_matmulnbits
from lowbit.runtime.formats import AffineIntK, BinaryResidual, VQCodebook
from lowbit.runtime.packing import pack_rows, unpack_rows

from .onnx_graph import MSFT, GraphBuilder

# the grid for values that are on no uniform grid (VQ codebooks, BiLLM's levels): 8 bits by default (~1/17 of a
# 4-bit grid's error: ReALLM's perplexity in ORT +0.4% instead of +99.5%); 4 bits is ORT's fastest kernel (~1.4x
# the speed, ~0.6x the weights in memory) at that accuracy cost
GRID_BITS = 8
VALUE_GRID_BITS = (4, 8)
# ORT 1.32's 2-bit MatMulNBits is ~10x slower at 16-column blocks than at 32 (measured: BiLLM's salient node)
SALIENT_BLOCK = 32
BINARY_LOWERINGS = ("grid", "exact")
# "stock": only ONNX Runtime's own ops; "lowbit": formats stock ORT has no kernel for run in lowbit's library
ORT_KERNELS = ("stock", "lowbit")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def matmul_nbits(g: GraphBuilder, x: str, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bits: int, block: int, name: str, accuracy_level: int) -> tuple[str, int]:
    """``x @ W.T`` for integer ``codes (N, K)`` (< 2**bits), per-block ``scales (N, kb)`` and integer ``zeros
    (N, kb)``: ``W = (codes - zeros) * scales`` per block of ``block`` columns. Returns (output, bytes)."""
    n, k = codes.shape
    ob = ort_bits(bits)
    int_zeros = not zeros.is_floating_point()  # float zero points (ORT takes them at 2 and 4 bits): half-integers
    b, sc, zp = repack_for_matmulnbits(pack_rows(codes.to(torch.uint8), ob), scales.float(),
                                       pack_rows(zeros.to(torch.uint8), ob) if int_zeros else None, ob, block, k,
                                       torch.float32, block)
    if not int_zeros:
        zp = zeros.float().contiguous()
    names = [g.init(f"{name}.B", _np(b)), g.init(f"{name}.scales", _np(sc)), g.init(f"{name}.zp", _np(zp))]
    y = g.op("MatMulNBits", [x, *names], domain=MSFT, name=name, K=k, N=n, bits=ob, block_size=block,
             accuracy_level=accuracy_level)
    return y, b.numel() + sc.numel() * 4 + zp.numel()


def grid_codes(w: torch.Tensor, bits: int, block: int, shrink=(1.0, 0.95, 0.9, 0.85, 0.8, 0.75)):
    """Round ``w (N, K)`` onto a ``bits``-bit grid per block of ``block`` columns, the range of each block shrunk
    by whichever factor of ``shrink`` gives it the least squared error (clipping the extremes pays when the other
    values gain resolution): ``(codes, scales, zeros, rel_err)`` with ``W ~ (codes - zeros) * scales``."""
    n, k = w.shape
    kb = -(-k // block)
    wp = torch.zeros(n, kb * block)
    wp[:, :k] = w
    blocks = wp.view(n, kb, block)
    qmax = (1 << bits) - 1
    best = None
    for f in shrink:
        lo = blocks.amin(-1).clamp(max=0) * f
        hi = blocks.amax(-1).clamp(min=0) * f
        scale = ((hi - lo) / qmax).clamp(min=1e-12)
        zero = torch.round(-lo / scale).clamp(0, qmax)
        codes = torch.clamp(torch.round(blocks / scale[..., None]) + zero[..., None], 0, qmax)
        err = ((codes - zero[..., None]) * scale[..., None] - blocks).pow(2).sum(-1)
        if best is None:
            best = [codes, scale, zero, err]
        else:
            better = err < best[3]
            best[0] = torch.where(better[..., None], codes, best[0])
            best[1] = torch.where(better, scale, best[1])
            best[2] = torch.where(better, zero, best[2])
            best[3] = torch.minimum(err, best[3])
    codes, scale, zero, _ = best
    deq = ((codes - zero[..., None]) * scale[..., None]).view(n, -1)[:, :k]
    err = float((deq - w).norm() / w.norm().clamp(min=1e-12))
    return codes.view(n, -1)[:, :k].to(torch.uint8), scale, zero.to(torch.uint8), err


def _float_matmul(g: GraphBuilder, x: str, w: torch.Tensor, name: str) -> tuple[str, int]:
    wt = _np(w.float().t().contiguous())
    return g.op("MatMul", [x, g.init(f"{name}.weight_t", wt)], name=name), wt.nbytes


def _add(g: GraphBuilder, y: str, other: str, name: str) -> str:
    return g.op("Add", [y, other], name=name)


def _lowrank(g: GraphBuilder, x: str, y: str, lr, name: str) -> tuple[str, int]:
    t, b1 = _float_matmul(g, x, lr.lora_a, f"{name}.lora_a")
    t, b2 = _float_matmul(g, t, lr.lora_b, f"{name}.lora_b")
    return _add(g, y, t, f"{name}.lowrank_add"), b1 + b2


def _affine(g, x, fmt: AffineIntK, name, accuracy_level, max_block):
    from lowbit.passes.ort_layout import doubled_symmetric, why_not_matmulnbits

    k, gs = fmt.in_features, fmt.group_size
    qw, scales, zeros, bits = fmt.qweight, fmt.scales, fmt.zeros, fmt.bits
    doubled = fmt.symmetric and bits < 8  # integer zero points (ORT's float ones are slow): see doubled_symmetric
    if doubled:
        qw, scales, zeros, bits = doubled_symmetric(qw, scales, bits, gs, k)
    why = why_not_matmulnbits(bits, gs, zeros is None)
    if why:
        y, nb = _float_matmul(g, x, fmt.dequantize(), name)
        return y, nb, f"float MatMul ({why})", 0.0
    blk = min(gs, max_block) if max_block else gs
    rep = gs // blk
    kb = -(-k // blk)
    sc = scales.float().repeat_interleave(rep, 1)[:, :kb]
    zp = unpack_rows(zeros, bits, scales.shape[1]).repeat_interleave(rep, 1)[:, :kb].to(torch.uint8)
    y, nb = matmul_nbits(g, x, unpack_rows(qw, bits, k), sc, zp, bits, blk, name, accuracy_level)
    how = f"MatMulNBits {ort_bits(bits)}-bit block {blk}" + (" (codes doubled: symmetric)" if doubled else "")
    return y, nb, how, 0.0


def _doubled(g: GraphBuilder, x: str, k: int, block: int) -> str:
    """``[x, 0.., x, 0..]``: ``x`` zero-padded to whole blocks, twice along the last axis (one node pair per input,
    shared by every linear reading it), so that two planes over the same columns are one ``MatMulNBits``."""
    kp = -(-k // block) * block
    key = ("doubled", x, kp)
    if key not in g.memo:
        xp = x
        if kp != k:
            xp = g.op("Pad", [x, g.const_i64(f"{x}.pads", [0, kp - k]), None, g.const_i64(f"{x}.pad_axes", [-1])],
                      name=f"{x}.pad")
        g.memo[key] = g.op("Concat", [xp, xp], name=f"{x}.doubled", axis=-1)
    return g.memo[key]


def _binary_grid(g, x, fmt: BinaryResidual, name, accuracy_level, block, grid_bits: int):
    """BiLLM's levels (per row-block: +-alpha_c, +-alpha_s and the salient sums) on a ``grid_bits`` grid per
    ``block`` columns; the fp16 outlier columns stay exact in one thin float ``MatMul``."""
    full = fmt.dequantize()
    w = full.clone()
    if fmt.outlier_cols is not None:
        w[:, fmt.outlier_cols.long()] = 0.0
    codes, sc, zp, _ = grid_codes(w, grid_bits, block)
    y, nb = matmul_nbits(g, x, codes, sc, zp, grid_bits, block, name, accuracy_level)
    deq = ((codes.float() - zp.float().repeat_interleave(block, 1)[:, : w.shape[1]])
           * sc.repeat_interleave(block, 1)[:, : w.shape[1]])
    if fmt.outlier_cols is not None:
        oc = fmt.outlier_cols.long()
        deq[:, oc] = full[:, oc]
        xo = g.op("Gather", [x, g.const_i64(f"{name}.outlier_idx", oc.tolist())], name=f"{name}.outlier_gather",
                  axis=-1)
        t, b2 = _float_matmul(g, xo, fmt.outlier_vals.float(), f"{name}.outliers")
        y = _add(g, y, t, f"{name}.outlier_add")
        nb += b2
    err = float((deq - full).norm() / full.norm().clamp(min=1e-12))
    return y, nb, f"BiLLM levels on a {grid_bits}-bit grid, block {block}: MatMulNBits", err


def _binary(g, x, fmt: BinaryResidual, name, accuracy_level, vq_block, mode: str, grid_bits: int):
    n, k, bs = fmt.out_features, fmt.in_features, fmt.block_size
    if mode == "grid" or fmt.mus is not None or bs < 16 or bs & (bs - 1):
        return _binary_grid(g, x, fmt, name, accuracy_level, bs if bs >= 16 and not bs & (bs - 1) else vq_block,
                            grid_bits)
    s = unpack_rows(fmt.signs, 1, k).to(torch.uint8)  # 1 = +1
    sal = fmt.salient_cols.long()
    non_sal = torch.ones(k, dtype=torch.bool)
    non_sal[sal] = False
    sparse = torch.zeros(n, k, dtype=torch.uint8)
    sparse[:, non_sal] = unpack_rows(fmt.group, 1, k - int(sal.numel())).to(torch.uint8)
    live = non_sal.clone()
    if fmt.outlier_cols is not None:
        live[fmt.outlier_cols.long()] = False
    kb = -(-k // bs)
    kp = kb * bs
    # the concentrated and the sparse plane side by side over [x, x]: codes 1 + sign inside the part, 1 (= 0) outside
    codes = torch.ones(n, 2 * kp, dtype=torch.uint8)
    for half, mask in enumerate(((sparse == 0) & live, (sparse == 1) & live)):
        codes[:, half * kp : half * kp + k] = torch.where(mask, 2 * s, torch.ones_like(s))
    scales = torch.cat([fmt.alphas[..., 2].float(), fmt.alphas[..., 3].float()], 1)
    y, total = matmul_nbits(g, _doubled(g, x, k, bs), codes, scales, torch.ones(n, 2 * kb, dtype=torch.uint8), 2, bs,
                            f"{name}.planes", accuracy_level)
    outs, nodes = [y], 1
    if sal.numel():  # salient columns gathered twice ([x_s, x_s]), each block's padded to 16 to keep its alphas
        idx, src, blocks = [], [], []
        for b in range(kb):
            pos = torch.nonzero((sal >= b * bs) & (sal < (b + 1) * bs)).flatten()
            if not pos.numel():
                continue
            pad = -(-pos.numel() // SALIENT_BLOCK) * SALIENT_BLOCK
            idx += sal[pos].tolist() + [int(sal[pos[0]])] * (pad - pos.numel())
            src += pos.tolist() + [-1] * (pad - pos.numel())
            blocks += [b] * (pad // SALIENT_BLOCK)
        src_t = torch.tensor(src)
        real = src_t >= 0
        ks = len(idx)
        xs = g.op("Gather", [x, g.const_i64(f"{name}.salient_idx", idx + idx)], name=f"{name}.salient_gather", axis=-1)
        r = unpack_rows(fmt.residual_signs, 1, int(sal.numel())).to(torch.uint8)
        codes = torch.ones(n, 2 * ks, dtype=torch.uint8)
        codes[:, :ks][:, real] = 2 * s[:, sal][:, src_t[real]]
        codes[:, ks:][:, real] = 2 * r[:, src_t[real]]
        sc = torch.cat([fmt.alphas[..., 0].float()[:, blocks], fmt.alphas[..., 1].float()[:, blocks]], 1)
        y, nb = matmul_nbits(g, xs, codes, sc, torch.ones_like(sc, dtype=torch.uint8), 2, SALIENT_BLOCK, f"{name}.salient",
                             accuracy_level)
        outs.append(y)
        total += nb
        nodes += 1
    if fmt.outlier_cols is not None:
        xo = g.op("Gather", [x, g.const_i64(f"{name}.outlier_idx", fmt.outlier_cols.long().tolist())],
                  name=f"{name}.outlier_gather", axis=-1)
        y, nb = _float_matmul(g, xo, fmt.outlier_vals.float(), f"{name}.outliers")
        outs.append(y)
        total += nb
    y = outs[0]
    for i, o in enumerate(outs[1:]):
        y = _add(g, y, o, f"{name}.sum{i}")
    return y, total, f"exact ternary planes: MatMulNBits 2-bit x{nodes}", 0.0


def _grid(g, x, w, name, accuracy_level, block, what, grid_bits: int):
    codes, sc, zp, err = grid_codes(w, grid_bits, block)
    y, nb = matmul_nbits(g, x, codes, sc, zp, grid_bits, block, name, accuracy_level)
    return y, nb, f"{what} on a {grid_bits}-bit grid, block {block}: MatMulNBits", err


def _vq(g, x, fmt: VQCodebook, name, accuracy_level, vq_block, fold_lowrank: bool, grid_bits: int):
    n, k = fmt.out_features, fmt.in_features
    idx = unpack_rows(fmt.codes, fmt.index_bits, k // fmt.vec_dim).long()
    wp = fmt.codebook.float()[idx].reshape(n, k) * fmt.scales.float()[:, torch.arange(k) // fmt.group_size]
    if fold_lowrank:  # the low-rank term joins the grid (stored column order): no MatMul pair, error measured
        dense = fmt.lowrank.dense()
        wp = wp + (dense[:, fmt.perm.long()] if fmt.perm is not None else dense)
    xin, perm_bytes = x, 0
    if fmt.perm is not None:  # x[..., perm] @ Wp.T: the stored column order, no permuted weight copy
        perm = fmt.perm.long().tolist()
        key = ("perm", x, tuple(perm))  # act-order: q/k/v (and gate/up) share the input's order, so one Gather
        if key not in g.memo:  # and their MatMulNBits nodes read the same tensor (then merged: onnx_fuse)
            g.memo[key] = g.op("Gather", [x, g.const_i64(f"{name}.perm", perm)], name=f"{name}.perm_gather", axis=-1)
            perm_bytes = k * 8
        xin = g.memo[key]
    gs = fmt.group_size  # one scale per group: the grid per group spans that scale times the codebook's values
    block = gs if 16 <= gs <= 128 and not gs & (gs - 1) else vq_block
    what = "VQ codebook values x group scales" + (" + low-rank term" if fold_lowrank else "")
    y, nb, how, err = _grid(g, xin, wp, name, accuracy_level, block, what, grid_bits)
    return y, nb + perm_bytes, how, err


def _vq_kernel(g, x, fmt: VQCodebook, name, bias=None):
    """One ``lowbit.ort::VQMatMul`` node over the format's own tensors (see runtime/ort_kernels/lowbit_ort_ops.cc),
    the bias (if any) its last input."""
    from lowbit.runtime.ort_ops import DOMAIN

    t = {"codes": fmt.codes, "codebook": fmt.codebook, "scales": fmt.scales}
    if fmt.perm is not None:
        t["perm"] = fmt.perm.to(torch.int32)  # int16 on disk; the op reads int32 (K * 4 bytes)
    if fmt.lowrank is not None:
        t["lora_a"], t["lora_b"] = fmt.lowrank.lora_a, fmt.lowrank.lora_b
    if bias is not None:
        t["bias"] = bias.float()
    ins = [x] + [g.init(f"{name}.{k}", _np(t[k].contiguous())) if k in t else ""
                 for k in ("codes", "codebook", "scales", "perm", "lora_a", "lora_b", "bias")]
    while ins[-1] == "":
        ins.pop()
    y = g.op("VQMatMul", ins, domain=DOMAIN, name=name, index_bits=fmt.index_bits, vec_dim=fmt.vec_dim,
             group_size=fmt.group_size)
    nb = sum(v.numel() * v.element_size() for k, v in t.items() if k != "bias")
    how = "VQ codes read by lowbit.ort::VQMatMul (exact" + (", low-rank term included)" if fmt.lowrank else ")")
    return y, nb, how, 0.0


def _binary_kernel(g, x, fmt: BinaryResidual, name, bias=None, accuracy_level: int = 0):
    """One ``lowbit.ort::BinaryMatMul`` node over the format's planes (see runtime/ort_kernels/lowbit_ort_ops.cc);
    the group plane, stored over the non-salient columns, is spread over all K columns (bit = sparse part), and the
    salient columns' sign bits are copied into a compact plane like the residual one (S bits per row).
    ``accuracy_level`` 4: in decode the regular columns' activations are rounded to int8 per block (the weights stay
    exact; salient and outlier columns float); else exact."""
    from lowbit.runtime.ort_ops import DOMAIN

    n, k = fmt.out_features, fmt.in_features
    non_sal = torch.ones(k, dtype=torch.bool)
    non_sal[fmt.salient_cols.long()] = False
    group = torch.zeros(n, k, dtype=torch.uint8)
    group[:, non_sal] = unpack_rows(fmt.group, 1, k - fmt.num_salient)
    t = {"signs": fmt.signs, "group": pack_rows(group, 1), "alphas": fmt.alphas}
    if fmt.mus is not None:
        t["mus"] = fmt.mus
    if fmt.num_salient:  # the salient columns' signs also compact, so the kernel reads them 8 at a time
        sal = fmt.salient_cols.long()
        t["salient_cols"] = fmt.salient_cols.to(torch.int32)
        t["salient_signs"] = pack_rows(unpack_rows(fmt.signs, 1, k)[:, sal], 1)
        t["residual_signs"] = fmt.residual_signs
    if fmt.num_outliers:
        t["outlier_cols"], t["outlier_vals"] = fmt.outlier_cols.to(torch.int32), fmt.outlier_vals
    if bias is not None:
        t["bias"] = bias.float()
    order = ("signs", "group", "alphas", "mus", "salient_cols", "salient_signs", "residual_signs", "outlier_cols",
             "outlier_vals", "bias")
    ins = [x] + [g.init(f"{name}.{key}", _np(t[key].contiguous())) if key in t else "" for key in order]
    while ins[-1] == "":
        ins.pop()
    level = 4 if accuracy_level == 4 else 0
    y = g.op("BinaryMatMul", ins, domain=DOMAIN, name=name, block_size=fmt.block_size, accuracy_level=level)
    nb = sum(v.numel() * v.element_size() for k, v in t.items() if k != "bias")
    how = ("exact weights; decode activations int8 per block (accuracy_level 4)" if level == 4 else "exact")
    return y, nb, f"BiLLM planes read by lowbit.ort::BinaryMatMul ({how})", 0.0


def lower_linear(g: GraphBuilder, x: str, fmt, name: str, weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, accuracy_level: int = 4, max_block: int | None = 32,
                 vq_block: int = 32, binary: str = "grid", vq_lowrank: str = "fold",
                 grid_bits: int = GRID_BITS, kernels: str = "stock") -> tuple[str, dict]:
    """Emit one linear; ``fmt`` is the artifact's format, or ``None`` with the float ``weight``. ``binary``:
    ``grid`` (BiLLM on a ``grid_bits`` grid: one node, ~1.7x the format's bytes at 4 bits) or ``exact``
    (ternary planes). ``vq_lowrank``: a VQ format's low-rank term as an exact float ``MatMul`` pair (``exact``) or
    added to the weight before its grid (``fold``: three nodes fewer per input, error recorded). ``grid_bits``
    (4 or 8): the grid of the values that are on no uniform grid (BiLLM's levels, VQ values x scales).
    ``kernels``: ``lowbit`` runs VQ and BiLLM formats in lowbit's ONNX Runtime library (exact, packed bytes
    resident)."""
    if grid_bits not in VALUE_GRID_BITS:
        raise ValueError(f"{name}: the value grid must have 4 or 8 bits, got {grid_bits}")
    if fmt is None:
        y, nb = _float_matmul(g, x, weight, name)
        rec = {"lowering": "float MatMul", "ort_bytes": nb, "packed_bytes": weight.numel() * 2, "rel_err": 0.0}
    else:
        if isinstance(fmt, AffineIntK):
            y, nb, how, err = _affine(g, x, fmt, name, accuracy_level, max_block)
        elif isinstance(fmt, BinaryResidual) and kernels == "lowbit":
            y, nb, how, err = _binary_kernel(g, x, fmt, name, bias, accuracy_level)
            bias = None  # added inside the node
        elif isinstance(fmt, BinaryResidual):
            y, nb, how, err = _binary(g, x, fmt, name, accuracy_level, vq_block, binary, grid_bits)
        elif isinstance(fmt, VQCodebook) and kernels == "lowbit":
            y, nb, how, err = _vq_kernel(g, x, fmt, name, bias)
            bias = None  # added inside the node
        elif isinstance(fmt, VQCodebook):
            fold = vq_lowrank == "fold" and fmt.lowrank is not None
            y, nb, how, err = _vq(g, x, fmt, name, accuracy_level, vq_block, fold, grid_bits)
        else:
            raise TypeError(f"{name}: no ONNX Runtime lowering for format {type(fmt).__name__}")
        lr = getattr(fmt, "lowrank", None)
        if lr is not None and not (isinstance(fmt, VQCodebook) and (vq_lowrank == "fold" or kernels == "lowbit")):
            y, lb = _lowrank(g, x, y, lr, name)
            nb += lb
            how += " + low-rank MatMul pair"
        rec = {"lowering": how, "ort_bytes": nb, "packed_bytes": fmt.nbytes(), "rel_err": err}
    if bias is not None:
        y = _add(g, y, g.init(f"{name}.bias", _np(bias.float())), f"{name}.bias_add")
    return y, rec
