"""A VQ-format (ReALLM) or affine + low-rank (ApiQ) decoder of a real model's shapes, for speed and memory rows
only, in minutes.

ReALLM's calibration of SmolLM2 takes ~1-2 CPU-minutes per block (k-means per candidate). ONNX Runtime's speed
and memory depend only on the formats' shapes (vector length, index bits, group, rank, permutation), not on
how well the codebook was fitted. This script gives every linear of the model the format ``d<D>b<B>g<G>r<R>``
with a one-pass fit: per-group scales from the rows' group norms, a codebook sampled from the scaled weight
vectors, nearest-entry indices, a random permutation per input (shared by q/k/v and by gate/up, as ReALLM's
act-order from the input's Hessian is) and a rank-R SVD of the residual. It writes
``OUT/onnx/decoder.onnx`` with the same direct builder ``lowbit-export`` uses and an ``export.json`` for
``benchmarks/onnx_decode.py``. Its perplexity means nothing (not a calibrated model); use it for speed and bytes.

``--format w2g64r8``: RTN codes plus a rank-R SVD of the residual (ApiQ's storage; ApiQ's calibration takes hours).
``--format billm-b128``: BiLLM's binary-residual planes (4 salient columns per 128-column block, the largest 15% of
the other weights in the sparse group, alphas from the parts' mean magnitudes; BiLLM's calibration takes ~30 minutes).

``--ort-kernels lowbit``: VQ layers as ``lowbit.ort::VQMatMul`` (lowbit's ONNX Runtime library, built first).

Usage: python benchmarks/vq_format_decoder.py --format d4b8g128r8 --head 4 -o out/speed/vq-d4b8g128r8-h4
       python benchmarks/vq_format_decoder.py --format w2g64r8 --head 4 -o out/speed/apiq-w2g64r8-h4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

import torch


def fit_vq(w: torch.Tensor, d: int, b: int, g: int, r: int, gen: torch.Generator, perm: torch.Tensor):
    from lowbit.runtime.formats import LowRank, VQCodebook

    n, k = w.shape
    wp = w[:, perm]
    scales = wp.view(n, k // g, g).pow(2).mean(-1).sqrt().clamp(min=1e-8) if k % g == 0 else \
        torch.stack([c.pow(2).mean(-1).sqrt() for c in wp.split(g, 1)], 1).clamp(min=1e-8)
    x = (wp / scales.repeat_interleave(g, 1)[:, :k]).reshape(-1, d)
    book = x[torch.randint(0, x.shape[0], (1 << b,), generator=gen)].clone()
    idx = torch.cat([torch.cdist(c, book).argmin(1) for c in x.split(65536)])
    lr = None
    if r:
        deq = (book[idx].reshape(n, k) * scales.repeat_interleave(g, 1)[:, :k])
        res = torch.empty_like(w)
        res[:, perm] = wp - deq
        u, s, v = torch.svd_lowrank(res, q=r)
        lr = LowRank((v * s).t().contiguous(), u.contiguous())
    return VQCodebook.from_indices(idx.view(n, k // d), book, scales, b, g, perm=perm, lowrank=lr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--format", default="d4b8g128r8")
    ap.add_argument("--head", choices=["float", "4"], default="4", help="head (and tied embedding): RTN 4-bit g32")
    ap.add_argument("--vq-lowrank", choices=["exact", "fold"], default="fold",
                    help="the low-rank term as a float MatMul pair or folded into the 4-bit grid (lowbit-export's flag)")
    ap.add_argument("--ort-kernels", choices=["stock", "lowbit"], default="stock",
                    help="VQ/BiLLM layers on MatMulNBits grids (stock) or as lowbit.ort ops (lowbit-export's flag)")
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args()
    m = re.fullmatch(r"d(\d+)b(\d+)g(\d+)r(\d+)", a.format)
    ma = re.fullmatch(r"w(\d+)g(\d+)r(\d+)", a.format)  # ApiQ's format: uniform codes + a low-rank pair
    mb = re.fullmatch(r"billm-b(\d+)", a.format)  # BiLLM's binary-residual planes
    if mb:
        m, ma, d, b, g, r = None, None, 0, 1, int(mb.group(1)), 0
    elif not (m or ma):
        sys.exit(f"--format must look like d4b8g128r8 (VQ) or w2g64r8 (affine + low rank), got {a.format!r}")
    if not mb:
        d, b, g, r = map(int, m.groups()) if m else (0, *map(int, ma.groups()))
    from lowbit.compiler.engine import models
    from lowbit.compiler.lowering.onnx_llama import _build, _Tensors

    model, _, _ = models.load(a.model)
    gen = torch.Generator().manual_seed(0)
    formats = {}
    perms = {}  # ReALLM's act-order permutation comes from the input's Hessian: q/k/v share one, gate/up one
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            key = re.sub(r"(q|k|v)_proj$", "qkv", re.sub(r"(gate|up)_proj$", "gate_up", name))
            if key not in perms:
                perms[key] = torch.randperm(mod.in_features, generator=gen)
            w = mod.weight.detach().float()
            formats[name] = (fit_vq(w, d, b, g, r, gen, perms[key]) if m else _billm(w, g, gen) if mb
                             else _affine_lowrank(w, b, g, r))
    if a.head == "4":
        formats["lm_head"] = _rtn(model.get_output_embeddings().weight.detach().float(), 4, 32)
    tens = _Tensors(None)
    tens.t = dict(model.state_dict())
    out = Path(a.output) / "onnx"
    out.mkdir(parents=True, exist_ok=True)
    info = _build(model.config.to_dict(), tens, formats, out / "decoder.onnx", 4, None, 32, None, None, "grid",
                  True, vq_lowrank=a.vq_lowrank, kernels=a.ort_kernels)
    (out / "export.json").write_text(json.dumps({"graphs": {"decoder": "decoder.onnx"}, "cache": info["cache"],
                                                 "decoder": {k: v for k, v in info.items() if k != "layers"},
                                                 "synthetic_vq": a.format}, indent=1))
    bits = 8 * sum(f.nbytes() for n, f in formats.items() if n != "lm_head") / sum(
        f.in_features * f.out_features for n, f in formats.items() if n != "lm_head")
    worst = max(rec["rel_err"] for rec in info["layers"].values())
    print(f"{out}: {a.format} ({bits:.3f} true bits per weight in the linears), {info['nodes']} nodes, resident "
          f"weights {info['ort_weight_bytes'] / 2**20:.1f} MiB for {info['packed_bytes'] / 2**20:.1f} MiB packed, "
          f"grid error worst {worst:.3f}, mean {sum(r['rel_err'] for r in info['layers'].values()) / len(info['layers']):.3f}")
    return 0


def _billm(w: torch.Tensor, block: int, gen: torch.Generator):
    from lowbit.runtime.formats import BinaryResidual

    n, k = w.shape
    sal = torch.zeros(k, dtype=torch.bool)
    for b0 in range(0, k, block):  # 4 salient columns per block: the largest column norms
        cols = w[:, b0:b0 + block].norm(dim=0).topk(min(4, w[:, b0:b0 + block].shape[1])).indices + b0
        sal[cols] = True
    sparse = w.abs() > w.abs().quantile(0.85, dim=1, keepdim=True)
    alphas = torch.stack([w.abs()[:, b0:b0 + block].mean(1).expand(4, n).t() for b0 in range(0, k, block)], 1)
    alphas = alphas * torch.tensor([1.0, 0.3, 0.8, 2.0])
    res = w[:, sal] - alphas[:, torch.nonzero(sal).flatten() // block, 0] * w[:, sal].sign()
    return BinaryResidual.from_planes(w > 0, res > 0, sal, sparse, alphas, None, block)


def _affine_lowrank(w: torch.Tensor, bits: int, group: int, r: int):
    from lowbit.runtime.formats import LowRank

    fmt = _rtn(w, bits, group)
    if r:
        u, s, v = torch.svd_lowrank(w - fmt.dequantize(), q=r)
        fmt = dataclasses.replace(fmt, lowrank=LowRank((v * s).t().contiguous().half(), u.contiguous().half()))
    return fmt


def _rtn(w: torch.Tensor, bits: int, group: int):
    from lowbit.runtime.formats import AffineIntK

    n, k = w.shape
    q = w.view(n, k // group, group)
    lo, hi = q.amin(-1), q.amax(-1)
    scale = ((hi - lo) / ((1 << bits) - 1)).clamp(min=1e-8)
    zero = torch.round(-lo / scale).clamp(0, (1 << bits) - 1)
    codes = torch.clamp(torch.round(q / scale[..., None]) + zero[..., None], 0, (1 << bits) - 1)
    return AffineIntK.from_codes(codes.view(n, k).to(torch.uint8), scale, zero.to(torch.uint8), bits, group)


if __name__ == "__main__":
    sys.exit(main())
