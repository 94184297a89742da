"""``billm``: BiLLM (Huang et al., ICML 2024) post-training binarization, stored for real.

Per linear ``W (N, K)`` with Hessian ``H`` (quantized-chain inputs of its block) and ``U = chol((H+dI)^-1)^T``:
the columns are swept in blocks of ``block_size`` (128). For each block:

1. salience ``S = W^2 / U_jj^2`` (paper Eq. 3) on the already-compensated weights;
2. structural search for salient columns: columns ranked by ``sum_rows S``; for each candidate count
   ``k`` the top-k columns are residual-binarized (order 2) and the rest binarized (order 2, as the
   official code does for the search), and the ``k`` with the least error wins;
3. bell-shaped split of the non-salient weights into a *concentrated* (``|.| < p``) and a *sparse*
   (``|.| >= p``) group, each binarized (order 1); the ``p`` with the least error wins;
4. the block is binarized with those masks; its error ``(W - Q) / U_jj`` is propagated to the later
   columns through ``U`` (block-level compensation only, as in the paper).

Binarization of entries ``w`` under a mask, per row: ``mu = mean(w)`` (if ``mean_shift``, else 0),
``alpha = mean|w - mu|``, ``b = alpha * sign(w - mu) + mu``; order 2 repeats this on the residual.

Paper vs official code (both available):

=================  ===========================================  ==========================================
option             paper                                        official code
=================  ===========================================  ==========================================
``mean_shift``     False (``alpha * sign(w)``)                  True (per row, group and order)
``search_on``      ``"w"`` (error measured on W)                ``"s"`` (error measured on S)
``search_ranges``  ``"paper"``: k in 3..30, p = i*max|W|,       ``"code"``: k in 1..49, p = 81 quantiles
                   i = 0.1..0.9                                 (10%..90%) of the non-salient values
=================  ===========================================  ==========================================

All candidate searches are batched tensor operations (candidates along a leading dimension).

Extension (``outlier_ratio``, default 100; 0 = the paper's algorithm): input channels with massive
activations (Hessian diagonal over 100x its median; SmolLM2 has two in 11.mlp.down_proj, about 1e6x, and
a handful in 0.self_attn.o_proj) are not binarized but stored as fp16 columns (``outlier_cols`` /
``outlier_vals`` of the format), at most 1/64 of the columns. A binarized weight times a 1e6x activation
is what makes BiLLM collapse on such models; these columns cost about 0.01 bits per weight model-wide.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.runtime.formats import BinaryResidual

from .base import HessianMethod, register
from .gptq import _inverse_cholesky_upper

BLOCK_SIZES = (32, 64, 128, 256)


@dataclass
class BiLLMConfig:
    # Defaults are the paper's variant: on SmolLM2 (benchmarks/billm_variants.py, blocks 0/14/29) it has a
    # lower Hessian-weighted output error than the official code's (0.062 vs 0.075), stores 0.54 fewer
    # bits per weight (no means) and searches 3x faster. Searching on W instead of S is what matters.
    block_size: int = 128
    mean_shift: bool = False
    search_on: str = "w"  # "w" (paper) or "s" (official code)
    search_ranges: str = "paper"  # "paper" or "code"
    damp: float = 0.01
    # The searched k and p are shared by all rows of a block, so the searches run on a fixed random
    # subset of rows (the final binarization always uses every row). 0 = search on all rows.
    search_rows: int = 256
    # Extension (not in the paper): input channels whose Hessian diagonal exceeds ``outlier_ratio`` x its
    # median (massive activations, e.g. the attention-sink channels of SmolLM2's layers 0 and 11) are kept as
    # fp16 columns instead of being binarized; at most ``max_outlier_fraction`` of the columns. 0 = off.
    # On SmolLM2 this takes 11.mlp.down_proj from 0.49 to 0.0001 Hessian-weighted error (2 columns) and
    # 0.self_attn.o_proj from 0.16 to 0.016 (7 columns); layers without massive activations are untouched.
    outlier_ratio: float = 100.0
    max_outlier_fraction: float = 1 / 64

    def validate(self) -> None:
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"--billm-block-size must be one of {BLOCK_SIZES}, got {self.block_size}")
        if self.search_on not in ("s", "w"):
            raise ValueError(f"--billm-search-on must be 's' or 'w', got {self.search_on!r}")
        if self.search_ranges not in ("code", "paper"):
            raise ValueError(f"--billm-search-ranges must be 'code' or 'paper', got {self.search_ranges!r}")
        if not 0 < self.damp < 1:
            raise ValueError(f"--damp must be in (0, 1), got {self.damp}")
        if self.outlier_ratio < 0:
            raise ValueError(f"--billm-outlier-ratio must be >= 0, got {self.outlier_ratio}")
        if not 0 <= self.max_outlier_fraction <= 1:
            raise ValueError(f"max_outlier_fraction must be in [0, 1], got {self.max_outlier_fraction}")
        if self.search_rows < 0:
            raise ValueError(f"--billm-search-rows must be >= 0, got {self.search_rows}")

    def tag(self) -> str:
        v = ("-mu" if self.mean_shift else "") + ("-onS" if self.search_on == "s" else "") + \
            ("-coderanges" if self.search_ranges == "code" else "") + \
            (f"-out{self.outlier_ratio:g}" if self.outlier_ratio else "")
        return f"b{self.block_size}{v}"


def binarize(w: torch.Tensor, mask: torch.Tensor, mean_shift: bool):
    """Masked per-row binarization. ``w``: ``(..., N, B)``, ``mask``: broadcastable bool.

    Returns ``(b, alpha, mu)`` with ``b`` zero outside the mask, ``alpha``/``mu`` of shape ``(..., N)``.
    """
    m = mask.to(w.dtype)
    cnt = m.sum(-1).clamp(min=1)
    mu = (w * m).sum(-1) / cnt if mean_shift else torch.zeros(w.shape[:-1], dtype=w.dtype, device=w.device)
    d = w - mu.unsqueeze(-1)
    alpha = (d.abs() * m).sum(-1) / cnt
    # sign(0) is taken as +1 so every stored sign bit is meaningful.
    sgn = torch.where(d >= 0, 1.0, -1.0).to(w.dtype)
    b = (alpha.unsqueeze(-1) * sgn + mu.unsqueeze(-1)) * m
    return b, alpha, mu


def residual_binarize(w, mask, mean_shift, order: int):
    b1, a1, m1 = binarize(w, mask, mean_shift)
    if order == 1:
        return b1
    b2, _, _ = binarize(w - b1, mask, mean_shift)
    return b1 + b2


def _search_salient(target, score, cands, mean_shift):
    """Best number of salient columns: batched over the candidate counts ``cands``."""
    nb = target.shape[1]
    order = torch.argsort(score, descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(nb, device=order.device)
    ks = torch.tensor(cands, device=order.device)
    sal = (rank.unsqueeze(0) < ks.unsqueeze(1)).unsqueeze(1)  # (C, 1, B)
    t = target.unsqueeze(0)
    approx = residual_binarize(t, sal, mean_shift, 2) + residual_binarize(t, ~sal, mean_shift, 2)
    err = (t - approx).pow(2).sum((1, 2))
    best = int(torch.argmin(err))
    return sal[best, 0], int(ks[best])


def _search_split(target, sal_cols, cands, mean_shift):
    """Best break-point for the non-salient entries: batched over ``cands`` (values of |target|)."""
    t = target.unsqueeze(0)
    ns = ~sal_cols.view(1, 1, -1)
    sal_approx = residual_binarize(target, sal_cols.view(1, -1), mean_shift, 2).unsqueeze(0)
    p = cands.view(-1, 1, 1)
    sparse = (t.abs() >= p) & ns
    conc = (t.abs() < p) & ns
    approx = sal_approx + residual_binarize(t, conc, mean_shift, 1) + residual_binarize(t, sparse, mean_shift, 1)
    err = (t - approx).pow(2).sum((1, 2))
    best = int(torch.argmin(err))
    return float(cands[best])


def _outlier_columns(h, dead, ratio: float, max_fraction: float) -> torch.Tensor:
    """Input channels with massive activations: ``H_jj > ratio * median(H_jj)`` over the live columns,
    at most ``max_fraction`` of the columns (the largest first). ``ratio`` 0 = none."""
    k = h.shape[0]
    out = torch.zeros(k, dtype=torch.bool, device=h.device)
    live = ~dead
    if ratio <= 0 or not live.any():
        return out
    diag = torch.diag(h).float()
    med = diag[live].median()
    cand = torch.nonzero(live & (diag > ratio * med)).flatten()
    cap = int(max_fraction * k)
    if cand.numel() > cap:
        cand = cand[torch.argsort(diag[cand], descending=True)[:cap]]
    out[cand] = True
    return out


def _binarize_block(wb, d, rows, cfg: BiLLMConfig) -> dict:
    """Binarize one column block ``wb (N, B)`` (``d``: its ``U_jj``): salient search, split search, then the
    binarization with the stored (fp16) scales. Returns the planes, scales and the dequantized block."""
    n, width = wb.shape
    s = wb.pow(2) / d.pow(2).unsqueeze(0)
    target = s if cfg.search_on == "s" else wb
    if cfg.search_ranges == "code":
        kc = list(range(1, min(50, width)))
    else:
        kc = list(range(min(3, width - 1), min(31, width))) or [1]
    kc = [x for x in kc if 1 <= x < width] or [min(1, width)]
    tsub = target[rows]
    sal_cols, nsal = _search_salient(tsub, s.sum(0), kc, cfg.mean_shift) if width > 1 else (
        torch.ones(1, dtype=torch.bool, device=wb.device), 1)
    ns_vals = tsub[:, ~sal_cols].abs().flatten()
    if ns_vals.numel() == 0:
        p = float("inf")
    else:
        if cfg.search_ranges == "code":
            qs = torch.linspace(0.10, 0.90, 81, device=wb.device)
            cands = torch.quantile(ns_vals, qs)
        else:
            cands = torch.linspace(0.1, 0.9, 9, device=wb.device) * ns_vals.max()
        p = _search_split(tsub, sal_cols, cands, cfg.mean_shift)
    # Binarize the real weights with the chosen masks; the split threshold applies to |target|.
    sal2 = sal_cols.view(1, -1).expand(n, -1)
    sparse = (target.abs() >= p) & ~sal2
    conc = ~sparse & ~sal2
    b1, a1, m1 = binarize(wb, sal2, cfg.mean_shift)
    b2, a2, m2 = binarize(wb - b1, sal2, cfg.mean_shift)
    bc, ac, mc = binarize(wb, conc, cfg.mean_shift)
    bsp, asp, msp = binarize(wb, sparse, cfg.mean_shift)
    # Store in fp16, then recompute the block from the stored values (what inference will see).
    a = torch.stack([a1, a2, ac, asp], -1).half().float()
    m = torch.stack([m1, m2, mc, msp], -1).half().float()
    sg1 = (wb - m[:, 0:1]) >= 0
    sgc = (wb - m[:, 2:3]) >= 0
    sgs = (wb - m[:, 3:4]) >= 0
    base_sign = torch.where(sal2, sg1, torch.where(sparse, sgs, sgc))
    pm = lambda t: t.float() * 2 - 1  # noqa: E731
    first = a[:, 0:1] * pm(sg1) + m[:, 0:1]
    sg2 = (wb - first - m[:, 1:2]) >= 0
    q_sal = first + a[:, 1:2] * pm(sg2) + m[:, 1:2]
    q_c = a[:, 2:3] * pm(sgc) + m[:, 2:3]
    q_s = a[:, 3:4] * pm(sgs) + m[:, 3:4]
    q = torch.where(sal2, q_sal, torch.where(sparse, q_s, q_c))
    return {"q": q, "signs": base_sign, "salient": sal_cols, "sparse": sparse,
            "residual_signs": sg2[:, sal_cols], "alphas": a, "mus": m}


def billm_quantize(w: torch.Tensor, h: torch.Tensor, cfg: BiLLMConfig):
    """Binarize ``w (N, K)`` with Hessian ``h``; returns ``(BinaryResidual, info)``."""
    w = w.detach().clone().float()
    dev = w.device  # --device cuda: the whole solve runs there (the format is assembled on the CPU)
    h = h.detach().to(dev, torch.float64, copy=True)
    n, k = w.shape
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN/Inf")
    if not torch.isfinite(h).all():
        raise ValueError("Hessian contains NaN/Inf: calibration activations are not finite")
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    u64, used_damp = _inverse_cholesky_upper(h, cfg.damp)
    u = u64.float()
    bs = cfg.block_size
    nblocks = (k + bs - 1) // bs
    signs = torch.empty(n, k, dtype=torch.bool, device=dev)
    res_signs_cols = []
    salient = torch.zeros(k, dtype=torch.bool, device=dev)
    group = torch.zeros(n, k, dtype=torch.bool, device=dev)  # True = sparse group (non-salient only)
    alphas = torch.zeros(n, nblocks, 4, device=dev)
    mus = torch.zeros(n, nblocks, 4, device=dev)
    q_total = torch.empty(n, k, device=dev)
    rows = slice(None)
    if cfg.search_rows and n > cfg.search_rows:  # drawn on the CPU: the same rows on every device
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: cfg.search_rows].sort().values.to(dev)
    outliers = _outlier_columns(h, dead, cfg.outlier_ratio, cfg.max_outlier_fraction)
    for bi, c0 in enumerate(range(0, k, bs)):
        c1 = min(c0 + bs, k)
        keep = ~outliers[c0:c1]
        wb = w[:, c0:c1]
        # Outlier columns are stored in fp16 as they are now (compensated by the blocks before); only their
        # rounding error is left to spread.
        qb = wb.half().float()
        if keep.any():
            d = torch.diag(u)[c0:c1][keep]
            blk = _binarize_block(wb[:, keep], d, rows, cfg)
            qb[:, keep] = blk["q"]
            signs[:, c0:c1][:, keep] = blk["signs"]
            salient[c0:c1][keep] = blk["salient"]
            group[:, c0:c1][:, keep] = blk["sparse"]
            res_signs_cols.append(blk["residual_signs"])
            alphas[:, bi], mus[:, bi] = blk["alphas"], blk["mus"]
        signs[:, c0:c1][:, ~keep] = True
        q_total[:, c0:c1] = qb
        err = (wb - qb) / torch.diag(u)[c0:c1].unsqueeze(0)
        if c1 < k:
            w[:, c1:] -= err @ u[c0:c1, c1:]
    signs, salient, group, alphas, mus, outliers, q_total = (
        t.cpu() for t in (signs, salient, group, alphas, mus, outliers, q_total))
    fmt = BinaryResidual.from_planes(
        signs=signs, residual_signs=torch.cat(res_signs_cols, 1).cpu(), salient=salient, group=group,
        alphas=alphas, mus=mus if cfg.mean_shift else None, block_size=bs,
        outliers=outliers, outlier_vals=q_total[:, outliers],
    )
    # The stored format must reproduce exactly what the compensation assumed.
    if not torch.allclose(fmt.dequantize(), q_total, rtol=1e-5, atol=1e-6):
        raise RuntimeError("BinaryResidual packing does not reproduce the binarized weights")
    info = {"damp": used_damp, "salient_columns": int(salient.sum()), "dead_inputs": int(dead.sum()),
            "outlier_columns": int(outliers.sum()),
            "sparse_fraction": float(group[:, ~salient].float().mean()) if (~salient).any() else 0.0}
    return fmt, info


@register
class BiLLM(HessianMethod):
    name = "billm"
    Config = BiLLMConfig
    device_ready = True

    def quantize_linear(self, w, h):
        return billm_quantize(w, h, self.config)
