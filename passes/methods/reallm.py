"""``reallm``: ReALLM (Leconte et al., 2024) -- a low-rank part plus a vector-quantized residual, the
shape of each matrix's quantizer chosen under a budget of true bits per weight; stored as
:class:`~lowbit.runtime.formats.VQCodebook` (``lowbit::vq_linear``).

Per linear ``W (N, K)`` with Hessian ``H = 2/n X^T X`` of its quantized-chain inputs, and per candidate
``(vec_dim d, index_bits b, group_size g, rank r)``:

1. **Column order** (``perm="act-order"``): columns sorted by decreasing ``diag(H)``, stored as ``perm``,
   so that the scale groups and vectors follow importance and the error feedback below starts with the
   columns that matter most (ReALLM reorders columns too, to make the matrix smoother; ours is cheaper).
2. **Low-rank part** (``r > 0``), LQ-LoRA's alternation with an output-error (data-aware) SVD: ``L`` =
   the rank-``r`` minimizer of ``tr((W - Q - L) H (W - Q - L)^T)``, i.e. the truncated SVD of
   ``(W - Q) C`` mapped back through ``C^-1`` (``H = C C^T``); starting from ``Q = 0``, ``Q`` and ``L``
   alternate up to ``lq_iters`` times, stopping when the error grows; the iterate with the lowest error is kept.
3. **VQ residual** ``Q`` of ``R = W - L``: per row and group of ``g`` stored columns, a scale (the
   group's RMS); the scaled rows are cut into ``d``-vectors; one codebook of ``2**b`` entries per matrix
   is learned by k-means weighted by ``diag(H)`` (on at most ``kmeans_sample`` vectors, k-means++ start).
   The final assignment is GPTQ-style (as in GPTVQ): vectors are chosen left to right, each by the
   distance weighted with the inverse-Hessian diagonal, and the error of every column is spread over the
   columns not yet quantized.
4. **Choice per matrix**: every candidate is first scored with a cheap proxy (steps 2-3 with
   nearest-entry assignment, no error feedback) by its Hessian-weighted output error
   ``tr(E H E^T)``; within each decoder block the candidates are chosen by a Lagrangian search (then a
   greedy fill of the slack) to minimize the summed error while the block's bytes -- codes, codebook,
   scales, permutation and low-rank factors, exactly what the file stores -- stay within
   ``bits_budget`` bits per weight. Every block meets the budget, hence the model does; the calibration
   is block-sequential, so bits cannot move between blocks. The chosen candidate is then built with
   error feedback.

Candidates: ``candidates`` is ``"auto"`` (``d2b4 .. d2b7`` and ``d4b8``, each at ``g128``, for every
rank in ``ranks``) or a comma list of ``d<vec_dim>b<index_bits>g<group_size>r<rank>`` items. A candidate
whose ``d`` does not divide ``K`` is skipped for that matrix.

Fine-tuning of the low-rank parts (ReALLM's steps 2 and 3): ``block_epochs > 0`` trains each block's
factors against the float block right after its configuration is built (:meth:`ReALLM._finetune_block`);
end to end, ``lowbit-finetune DIR --train lora`` trains them on next-token loss through
``lowbit::vq_linear``. Finished blocks are checkpointed (:class:`~.checkpoints.BlockCheckpoints`), so an
interrupted calibration resumes with ``--resume``. Not implemented: ReALLM's neural (HNeRV) decoder, which its own code does not wire
in either; DoRA magnitudes (plain LoRA factors are stored).
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.runtime.formats import LowRank, VQCodebook
from lowbit.runtime.modules import swap_module

from .base import Method, register
from .base import progress as _log  # rank 0 alone prints under torchrun
from .checkpoints import BlockCheckpoints
from .data_parallel import WindowShard, active_world
from .gptq import _inverse_cholesky_upper

AUTO_CODES = ((2, 4), (2, 5), (2, 6), (2, 7), (4, 8))


@dataclass(frozen=True)
class Candidate:
    vec_dim: int
    index_bits: int
    group_size: int
    rank: int

    @property
    def name(self) -> str:
        return f"d{self.vec_dim}b{self.index_bits}g{self.group_size}r{self.rank}"

    def nbytes(self, n: int, k: int, permuted: bool) -> int:
        """Exact bytes of the stored :class:`VQCodebook` (codes, codebook, scales, perm, low-rank)."""
        codes = n * math.ceil(k // self.vec_dim * self.index_bits / 8)
        book = (1 << self.index_bits) * self.vec_dim * 2
        scales = n * math.ceil(k / self.group_size) * 2
        perm = (2 if k <= 32767 else 4) * k if permuted else 0
        return codes + book + scales + perm + 2 * self.rank * (n + k)


_CAND = re.compile(r"^d(\d+)b(\d+)g(\d+)r(\d+)$")


def parse_candidates(spec: str, ranks: tuple) -> list[Candidate]:
    if spec == "auto":
        return [Candidate(d, b, 128, r) for r in ranks for d, b in AUTO_CODES]
    out = []
    for item in spec.split(","):
        m = _CAND.match(item.strip())
        if not m:
            raise ValueError(f"--reallm-candidates: {item.strip()!r} is not d<vec_dim>b<index_bits>g<group>r<rank>, "
                             "e.g. d2b6g128r0")
        d, b, g, r = map(int, m.groups())
        if not (1 <= b <= 8 and d >= 1 and g >= 1 and r >= 0):
            raise ValueError(f"--reallm-candidates: {item.strip()!r} needs 1 <= b <= 8, d >= 1, g >= 1, r >= 0")
        out.append(Candidate(d, b, g, r))
    return out


@dataclass
class ReALLMConfig:
    bits_budget: float = 3.0  # true bits per weight, everything stored counted
    candidates: str = "auto"
    ranks: str = "0,8"  # ranks tried by the "auto" candidates
    perm: str = "act-order"  # or "none"
    lq_iters: int = 2
    kmeans_iters: int = 10
    kmeans_sample: int = 16384
    damp: float = 0.01
    block_epochs: int = 0  # block-wise fine-tuning of the low-rank parts against the float block (0: off)
    block_lr: float = 1e-4
    block_batch_size: int = 2
    val_windows: int = 8
    seed: int = 0

    def rank_list(self) -> tuple:
        try:
            ranks = tuple(int(r) for r in str(self.ranks).split(",") if r.strip())
        except ValueError:
            raise ValueError(f"--reallm-ranks must be comma-separated integers, got {self.ranks!r}") from None
        if not ranks or min(ranks) < 0:
            raise ValueError(f"--reallm-ranks must be non-negative integers, got {self.ranks!r}")
        return ranks

    def candidate_list(self) -> list[Candidate]:
        return parse_candidates(self.candidates, self.rank_list())

    def validate(self) -> None:
        if not 0.5 <= self.bits_budget <= 16:
            raise ValueError(f"--bits-budget must be in [0.5, 16] true bits per weight, got {self.bits_budget}")
        if self.perm not in ("act-order", "none"):
            raise ValueError(f"--reallm-perm must be act-order or none, got {self.perm!r}")
        if self.lq_iters < 1 or self.kmeans_iters < 1 or self.kmeans_sample < 16:
            raise ValueError("--reallm-lq-iters and --reallm-kmeans-iters must be >= 1")
        if self.block_epochs < 0 or self.block_batch_size < 1 or not self.block_lr > 0 or self.val_windows < 0:
            raise ValueError("--reallm-block-epochs and --reallm-val-windows must be >= 0, --reallm-block-lr > 0")
        if not 0 < self.damp < 1:
            raise ValueError(f"--damp must be in (0, 1), got {self.damp}")
        self.candidate_list()

    def tag(self) -> str:
        return f"b{self.bits_budget:g}"


# -- pieces -------------------------------------------------------------------------------------------


def _cholesky_lower(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Lower ``C`` with ``C C^T = H + damp * mean(diag H) * I`` (more damping until it factorizes)."""
    h = h.double()
    idx = torch.arange(h.shape[0], device=h.device)
    mean_diag = float(torch.diag(h).mean()) or 1.0
    for attempt in range(6):
        hd = h.clone()
        hd[idx, idx] += damp * 10**attempt * mean_diag
        c, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            return c
    raise ValueError("Hessian is not positive definite even with heavy damping")


def weighted_lowrank(r_mat: torch.Tensor, chol: torch.Tensor, rank: int) -> LowRank | None:
    """The rank-``rank`` ``B @ A`` minimizing ``||(R - B A) C||_F`` (= the Hessian-weighted error)."""
    if rank == 0:
        return None
    m = r_mat.double() @ chol
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    # A = diag(root) V_r^T C^-1, computed as a triangular solve: C^T A^T = V_r diag(root)
    a = torch.linalg.solve_triangular(chol.t(), vh[:r].t() * root, upper=True).t()
    b = u[:, :r] * root
    return LowRank(a.float(), b.float())


def _group_scales(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per row and group of stored columns: the group's RMS (never 0)."""
    n, k = w.shape
    g = math.ceil(k / group_size)
    pad = g * group_size - k
    sq = torch.nn.functional.pad(w.pow(2), (0, pad)).view(n, g, group_size).sum(-1)
    count = torch.full((g,), float(group_size), device=w.device)
    count[-1] = group_size - pad
    rms = (sq / count).sqrt()
    return rms.clamp(min=max(float(rms.max()) * 1e-6, 1e-12)).half().float()  # fp16, as stored


def _col_scales(scales: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    return scales[:, torch.arange(k, device=scales.device) // group_size]


def kmeans(vectors: torch.Tensor, weights: torch.Tensor, entries: int, iters: int, sample: int,
           gen: torch.Generator) -> torch.Tensor:
    """Codebook ``(entries, d)`` for ``vectors (M, d)`` minimizing the ``weights (M, d)``-weighted squared
    distance; k-means++ start on a random sample of at most ``sample`` vectors.

    Runs on the CPU whatever the vectors' device (the sample is small, and ``gen`` is a CPU generator: the
    draws are the same on every device); the codebook is returned on the vectors' device."""
    m, d = vectors.shape
    device = vectors.device
    if m > sample:
        pick = torch.randperm(m, generator=gen)[:sample].to(device)
        vectors, weights = vectors[pick], weights[pick]
        m = sample
    vectors, weights = vectors.cpu(), weights.cpu()
    entries_eff = min(entries, m)
    # k-means++ seeding (weighted distances)
    first = int(torch.randint(m, (1,), generator=gen))
    book = vectors[first:first + 1].clone()
    dist = ((vectors - book[0]).pow(2) * weights).sum(-1)
    for _ in range(1, entries_eff):
        p = dist.clamp(min=0) + 1e-30
        nxt = int(torch.multinomial(p / p.sum(), 1, generator=gen))
        book = torch.cat([book, vectors[nxt:nxt + 1]])
        dist = torch.minimum(dist, ((vectors - vectors[nxt]).pow(2) * weights).sum(-1))
    for _ in range(iters):
        assign = _nearest(vectors, weights, book)
        wsum = torch.zeros(entries_eff, d).index_add_(0, assign, weights)
        vsum = torch.zeros(entries_eff, d).index_add_(0, assign, weights * vectors)
        empty = wsum.sum(-1) == 0
        book = torch.where(wsum > 0, vsum / wsum.clamp(min=1e-30), book)
        if bool(empty.any()):  # re-seed empty entries at the worst-served vectors
            worst = ((vectors - book[assign]).pow(2) * weights).sum(-1).argsort(descending=True)
            book[empty] = vectors[worst[: int(empty.sum())]]
    if entries_eff < entries:  # fewer distinct vectors than entries: pad with copies (never chosen twice)
        book = torch.cat([book, book[:1].expand(entries - entries_eff, d)])
    return book.to(device)


def _nearest(vectors: torch.Tensor, weights: torch.Tensor, book: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """Index of the nearest codebook entry of each vector under per-coordinate weights."""
    out = []
    for i in range(0, vectors.shape[0], chunk):
        v, w = vectors[i:i + chunk], weights[i:i + chunk]
        # sum_j w_j (v_j - c_j)^2 = sum w v^2 - 2 sum w v c + sum w c^2; the first term is constant per row
        score = (w * v) @ book.t() * -2 + w @ book.t().pow(2)
        out.append(score.argmin(-1))
    return torch.cat(out)


@dataclass
class VQResult:
    indices: torch.Tensor  # (N, K/d) long
    codebook: torch.Tensor  # (C, d) float (fp16 values)
    scales: torch.Tensor  # (N, G) float (fp16 values)
    q: torch.Tensor  # (N, K) dequantized, stored column order


def vq_quantize(r_mat: torch.Tensor, hdiag: torch.Tensor, cand: Candidate, cfg: ReALLMConfig, gen: torch.Generator,
                u: torch.Tensor | None = None) -> VQResult:
    """VQ of ``r_mat (N, K)`` (stored column order). ``u``: the upper Cholesky factor of the inverse
    Hessian (stored order) for GPTQ-style error feedback; None: nearest-entry assignment (the proxy)."""
    n, k = r_mat.shape
    d, gs = cand.vec_dim, cand.group_size
    scales = _group_scales(r_mat, gs)
    cs = _col_scales(scales, k, gs)
    vec = (r_mat / cs).reshape(-1, d)
    wcol = hdiag.clamp(min=1e-12).expand(n, k).reshape(-1, d)  # column importance, per coordinate
    book = kmeans(vec, wcol, 1 << cand.index_bits, cfg.kmeans_iters, cfg.kmeans_sample, gen).half().float()
    if u is None:
        idx = _nearest(vec, wcol, book).view(n, k // d)
        q = book[idx].reshape(n, k) * cs
        return VQResult(idx, book, scales, q)
    w = r_mat.clone()
    q = torch.zeros_like(w)
    idx = torch.zeros(n, k // d, dtype=torch.long, device=w.device)
    dinv = 1.0 / torch.diag(u).pow(2)  # OBS weight of each column's error
    bs = max(d, 128 // d * d)
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for j0 in range(0, i2 - i1, d):
            cols = slice(i1 + j0, i1 + j0 + d)
            sc = cs[:, cols]
            v = w1[:, j0:j0 + d] / sc
            choice = _nearest(v, (dinv[cols] * sc.pow(2)), book)
            idx[:, (i1 + j0) // d] = choice
            qv = book[choice] * sc
            q[:, cols] = qv
            for t in range(d):
                j = j0 + t
                e = (w1[:, j] - qv[:, t]) / u1[j, j]
                w1[:, j + 1:] -= e[:, None] * u1[j, j + 1:][None, :]
                err1[:, j] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return VQResult(idx, book, scales, q)


def output_error(e: torch.Tensor, h: torch.Tensor) -> float:
    """``tr(E H E^T)``: the summed squared output error of the layer over the calibration tokens."""
    return float(((e.double() @ h.double()) * e.double()).sum())


def decompose(w: torch.Tensor, h: torch.Tensor, cand: Candidate, cfg: ReALLMConfig, gen: torch.Generator,
              feedback: bool):
    """``(VQCodebook, error)`` for one matrix and one candidate (see the module docstring)."""
    n, k = w.shape
    w = w.float()
    h = h.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    if cfg.perm == "act-order":
        perm = torch.argsort(torch.diag(h), descending=True)
    else:
        perm = torch.arange(k, device=w.device)
    hp = h[perm][:, perm]
    u = _inverse_cholesky_upper(hp.double(), cfg.damp)[0].float() if feedback else None
    chol = _cholesky_lower(h, cfg.damp) if cand.rank else None
    lowrank = weighted_lowrank(w, chol, cand.rank) if cand.rank else None
    best = None
    # the proxy scores one alternation: enough to rank candidates, half the cost
    for _ in range((cfg.lq_iters if feedback else 1) if cand.rank else 1):
        target = w if lowrank is None else w - lowrank.dense()
        res = vq_quantize(target[:, perm], torch.diag(hp), cand, cfg, gen, u)
        qfull = torch.empty_like(w)
        qfull[:, perm] = res.q
        if cand.rank:
            lowrank = weighted_lowrank(w - qfull, chol, cand.rank)
            lowrank = LowRank(lowrank.lora_a.half(), lowrank.lora_b.half())  # scored as stored
        approx = qfull if lowrank is None else qfull + lowrank.dense()
        err = output_error(w - approx, h)
        if best is not None and err >= best[1]:
            break  # the error grew: stop, as the official LQ-LoRA loop does (keeps the best iterate)
        best = (res, err, lowrank)
    res, err, lowrank = best
    # the format is assembled on the CPU, wherever the solve ran
    lowrank = None if lowrank is None else LowRank(lowrank.lora_a.cpu(), lowrank.lora_b.cpu())
    fmt = VQCodebook.from_indices(res.indices.cpu(), res.codebook.cpu(), res.scales.cpu(), cand.index_bits,
                                  cand.group_size, perm=None if cfg.perm == "none" else perm.cpu(), lowrank=lowrank)
    return fmt, err


def choose(options: dict, budget_bits: float) -> dict:
    """``options``: ``{name: [(candidate, nbytes, error, numel), ...]}`` -> ``{name: index}`` minimizing the
    summed error with ``8 * sum(nbytes) <= budget_bits * sum(numel)``. Lagrangian search, then a greedy
    fill of the remaining bytes by error saved per byte."""
    total_w = sum(opts[0][3] for opts in options.values())
    cap = budget_bits * total_w / 8
    cheapest = sum(min(o[1] for o in opts) for opts in options.values())
    if cheapest > cap:
        raise ValueError(f"--bits-budget {budget_bits} is below the smallest candidates "
                         f"({8 * cheapest / total_w:.3f} true bits per weight for this block)")

    def pick(lam):
        return {name: min(range(len(opts)), key=lambda i: (opts[i][2] + lam * opts[i][1], opts[i][1]))
                for name, opts in options.items()}

    def size(sel):
        return sum(options[n][i][1] for n, i in sel.items())

    lo, hi = 0.0, 1.0
    while size(pick(hi)) > cap:
        hi *= 4
        if hi > 1e30:
            break
    if size(pick(lo)) <= cap:
        sel = pick(lo)
    else:
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if size(pick(mid)) <= cap else (mid, hi)
        sel = pick(hi)
    while True:  # greedy: the upgrade with the most error saved per extra byte that still fits
        room = cap - size(sel)
        best = None
        for name, opts in options.items():
            cur = opts[sel[name]]
            for i, o in enumerate(opts):
                extra = o[1] - cur[1]
                gain = cur[2] - o[2]
                if gain > 0 and extra <= room and (best is None or gain / max(extra, 1) > best[0]):
                    best = (gain / max(extra, 1), name, i)
        if best is None:
            return sel
        sel[best[1]] = best[2]


class _LowRankStandIn(nn.Module):
    """The chosen VQ residual (frozen, dequantized once) plus trainable low-rank factors."""

    def __init__(self, fmt: VQCodebook, bias):
        super().__init__()
        base = VQCodebook.from_tensors(fmt.meta() | {"rank": 0},
                                       {k: v for k, v in fmt.tensors().items() if not k.startswith("lora_")})
        self.register_buffer("w", base.dequantize())
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.a = nn.Parameter(fmt.lowrank.lora_a.float().clone())
        self.b = nn.Parameter(fmt.lowrank.lora_b.float().clone())

    def forward(self, x):
        y = nn.functional.linear(x, self.w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return y + nn.functional.linear(nn.functional.linear(x, self.a.to(x.dtype)), self.b.to(x.dtype))

    def lowrank(self) -> LowRank:
        return LowRank(self.a.detach().half().contiguous(), self.b.detach().half().contiguous())


@register
class ReALLM(BlockCheckpoints, Method):
    name = "reallm"
    Config = ReALLMConfig
    device_ready = True  # search, decompositions and block fine-tuning run on the block's device (k-means on the CPU)

    def __init__(self, config):
        super().__init__(config)
        self.needs_float_stream = config.block_epochs > 0

    def _finetune_block(self, ctx, out: dict) -> dict | None:
        """ReALLM's block-wise step (the AQLM recipe, scaled down): train the block's low-rank factors so
        that the block on the quantized chain's inputs matches the float block on the float inputs (MSE;
        Adam, betas 0.9/0.95); the factors with the lowest loss on held-out windows are kept (the start
        included). Returns a summary, or None when the block has no low-rank part."""
        c = self.config
        names = [n for n, f in out.items() if f.lowrank is not None]
        if not names or c.block_epochs == 0:
            return None
        block, engine = ctx.block, ctx.engine
        dev = ctx.weight_of(ctx.linears[names[0]]).device  # the block's device (--device cuda)
        stand = {n: _LowRankStandIn(out[n], getattr(ctx.linears[n], "bias", None)).to(dev) for n in names}
        originals = {n: swap_module(block, n[len(ctx.prefix) + 1:], m) for n, m in stand.items()}
        own = {id(p) for m in stand.values() for p in m.parameters()}
        frozen = [p for p in block.parameters() if p.requires_grad and id(p) not in own]
        for p in frozen:
            p.requires_grad_(False)
        params = [p for m in stand.values() for p in (m.a, m.b)]
        shard = WindowShard(ctx)  # torchrun: this rank's windows of the one-process list (data_parallel.py)
        n_all = shard.n
        n_val = min(c.val_windows, n_all // 4)
        n_train = n_all - n_val
        xs, ys = ctx.quant_inputs, ctx.float_targets

        def loss_on(idx):
            x = torch.cat([xs[j] for j in idx])
            return nn.functional.mse_loss(engine.call_block(block, x), torch.cat([ys[j] for j in idx]))

        def val() -> float:
            if not n_val:
                return float("nan")
            with torch.no_grad():
                return shard.mean(range(n_train, n_all), lambda j: float(loss_on([j])))

        try:
            with torch.enable_grad():
                opt = torch.optim.Adam(params, lr=c.block_lr, betas=(0.9, 0.95))
                best = (val(), [p.detach().clone() for p in params])
                start = best[0]
                gen = torch.Generator().manual_seed(c.seed * 1_000_003 + ctx.index)
                for _epoch in range(c.block_epochs):
                    order = torch.randperm(n_train, generator=gen).tolist()
                    for i in range(0, n_train, c.block_batch_size):
                        opt.zero_grad(set_to_none=True)
                        value = shard.backward(shard.batch_loss(order[i:i + c.block_batch_size], loss_on), opt)
                        if not math.isfinite(value):
                            raise ValueError(f"low-rank fine-tuning loss became {value}; "
                                             "try a lower --reallm-block-lr")
                        opt.step()
                    v = val()
                    if v < best[0]:
                        best = (v, [p.detach().clone() for p in params])
                with torch.no_grad():
                    for p, b in zip(params, best[1]):
                        p.copy_(b)
        finally:
            for n, m in originals.items():
                swap_module(block, n[len(ctx.prefix) + 1:], m)
            for p in frozen:
                p.requires_grad_(True)
        for n, m in stand.items():
            f = out[n]
            out[n] = VQCodebook.from_tensors(f.meta(), {**f.tensors(), "lora_a": m.lowrank().lora_a,
                                                         "lora_b": m.lowrank().lora_b})
        return {"val_loss_before": start, "val_loss_after": best[0], "layers": len(names)}

    def calibrate_block(self, ctx) -> dict:
        c = self.config
        self.check_key(ctx)
        restored = self.restore_block(ctx)  # a finished block of an interrupted run (--resume)
        if restored is not None:
            return restored
        cands = c.candidate_list()
        hs = ctx.hessians(list(ctx.linears))
        # Under torchrun the search and the final decompositions are shared out by linear (all of a linear's
        # candidates on one rank, so its generator's stream is the one-process stream); the proxy errors are
        # summed over the ranks (zeros elsewhere) and each format is broadcast from the rank that made it.
        world = active_world(ctx)
        split = world is not None
        names = list(ctx.linears)
        fits_of, weights = {}, {}
        for name, mod in ctx.linears.items():
            w = ctx.weight_of(mod).float()
            fits = [cd for cd in cands if w.shape[1] % cd.vec_dim == 0]
            if not fits:
                raise ValueError(f"{name}: no candidate vector dimension divides in_features {w.shape[1]} "
                                 f"(candidates: {', '.join(cd.name for cd in cands)})")
            fits_of[name], weights[name] = fits, w
        cost = [float(weights[n].numel()) * len(fits_of[n]) for n in names]
        owner = world.owners(cost) if split else [0] * len(names)
        me = world.rank if split else 0
        errs = {n: torch.zeros(len(fits_of[n]), dtype=torch.float64) for n in names}
        for i, name in enumerate(names):
            if owner[i] != me:
                continue
            gen = torch.Generator().manual_seed(c.seed * 1_000_003 + zlib.crc32(name.encode()))
            for j, cd in enumerate(fits_of[name]):
                errs[name][j] = decompose(weights[name], hs[name], cd, c, gen, feedback=False)[1]
        if split:
            flat = world.sum_(torch.cat([errs[n] for n in names]))
            errs = dict(zip(names, flat.split([len(fits_of[n]) for n in names])))
        options = {}
        for name in names:
            n, k = weights[name].shape
            options[name] = [(cd, cd.nbytes(n, k, c.perm != "none"), float(errs[name][j]), n * k)
                             for j, cd in enumerate(fits_of[name])]
        sel = choose(options, c.bits_budget)
        owner = world.owners([float(weights[n].numel()) for n in names]) if split else owner
        out, infos = {}, {}
        for i, name in enumerate(names):
            cd, nbytes, proxy_err, numel = options[name][sel[name]]
            fmt = err = None
            if owner[i] == me:
                gen = torch.Generator().manual_seed(c.seed * 1_000_003 + zlib.crc32(name.encode()) + 1)
                fmt, err = decompose(weights[name], hs[name], cd, c, gen, feedback=True)
            if split:
                fmt, got = world.broadcast_result(fmt, {"err": err}, owner[i])
                err = got["err"]
            if fmt.nbytes() != nbytes:
                raise RuntimeError(f"{name}: stored {fmt.nbytes()} bytes, budgeted {nbytes}")
            infos[name] = {"reallm_config": cd.name, "reallm_proxy_error": proxy_err, "reallm_error": err,
                           "reallm_candidates": {o[0].name: {"bits": 8 * o[1] / o[3], "proxy_error": o[2]}
                                                 for o in options[name]},
                           **({"solved_by_rank": owner[i]} if split else {})}
            out[name] = fmt
        tuned = self._finetune_block(ctx, out)
        for name, mod in ctx.linears.items():
            ctx.set_weight(mod, out[name].dequantize())
            if tuned is not None:
                infos[name]["reallm_block_finetune"] = tuned
            ctx.record(name, infos[name])
        self.save_block(ctx, out, infos)
        bits = 8 * sum(f.nbytes() for f in out.values()) / sum(f.in_features * f.out_features for f in out.values())
        _log(f"[reallm] {ctx.prefix}: {bits:.3f} bits/weight; "
             + ", ".join(f"{n.rsplit('.', 1)[-1]} {options[n][sel[n]][0].name}" for n in out)
             + ("" if tuned is None else f"; low-rank fine-tuning: held-out block loss {tuned['val_loss_before']:.4g}"
                f" -> {tuned['val_loss_after']:.4g}"))
        return out
