"""``gptq``: GPTQ (Frantar et al., 2022) with group-wise scales, lazy block updates and optional act-order.

Per linear, with ``H = 2/n * sum x x^T`` over the quantized-chain inputs of its block:

1. dead inputs (``H[i,i] == 0``) get ``H[i,i] = 1`` and their weight column zeroed;
2. damping ``H += damp * mean(diag H) * I`` (retried with 10x more damping if Cholesky fails);
3. ``U = chol(H^-1)^T`` (upper); columns are quantized left to right, each one's error
   ``(w - q) / U[i,i]`` is spread over the not-yet-quantized columns through row ``i`` of ``U``; updates
   are applied lazily per block of ``block_size`` columns (the GPTQ paper's trick);
4. group parameters are computed when a group starts, from the already-updated weights.

With ``act_order`` columns are visited in decreasing ``diag(H)``. To keep groups contiguous in the
stored format (no per-column group index) the group parameters are then computed up front from the
original weights ("static groups", as GPTQModel's ``static_groups``): the format stays plain
``AffineIntK`` and every kernel and lowering runs it unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import HessianMethod, UniformConfig, register
from .quant import assemble, group_params


@dataclass
class GPTQConfig(UniformConfig):
    damp: float = 0.01
    block_size: int = 128
    # On by default: on SmolLM2 w4g128 it is what makes GPTQ beat RTN end to end (WikiText-2 ppl, see
    # README), and it lowers the Hessian-weighted layer error ~10% at 3 and 4 bits (held-out C4).
    act_order: bool = True

    def validate(self) -> None:
        super().validate()
        if not 0 < self.damp < 1:
            raise ValueError(f"--damp must be in (0, 1), got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"--gptq-block-size must be >= 1, got {self.block_size}")


# Above this many inputs the Hessian work runs in float32 (the reference GPTQ's precision) and in place: a
# 7B down_proj's 11008^2 float64 Hessian is 970 MB per copy, and the float64 path holds up to four copies.
# At or below it (every SmolLM2 layer) float64 with copies, as before.
LEAN_INPUTS = 2048


def _inverse_cholesky_upper(h: torch.Tensor, damp: float, in_place: bool = False) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + d I)^-1``; raises damping until it factorizes.

    ``in_place``: ``h`` is the caller's scratch copy; its diagonal is damped in place and its storage released
    (resized to 0 bytes) once factorized, and the inverse comes from ``cholesky_inverse`` (no identity matrix), so
    at most two matrices of ``h``'s size are alive at once."""
    mean_diag = float(torch.diag(h).mean())
    idx = torch.arange(h.shape[0], device=h.device)
    for attempt in range(6):
        d = damp * (10**attempt) * mean_diag
        if in_place:
            h.diagonal().add_(d)
            l, info = torch.linalg.cholesky_ex(h)
            h.diagonal().sub_(d)
            if int(info) != 0:
                continue
            h.untyped_storage().resize_(0)  # the factor replaces it (frees it for every alias)
            hinv = torch.cholesky_inverse(l)
            del l
            u, info2 = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info2) == 0:
                return u, damp * (10**attempt)
            raise RuntimeError("the inverse Hessian is not positive definite (in-place float32 path)")
        hd = h.clone()
        hd[idx, idx] += d
        l, info = torch.linalg.cholesky_ex(hd)
        del hd
        if int(info) == 0:
            hinv = torch.cholesky_solve(torch.eye(h.shape[0], dtype=h.dtype, device=h.device), l)  # faster than cholesky_inverse on CPU
            u, info2 = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info2) == 0:
                return u, damp * (10**attempt)
    raise RuntimeError("Hessian is not positive definite even with heavy damping")


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, cfg: GPTQConfig):
    """Quantize ``w (N, K)`` given Hessian ``h (K, K)``; returns ``(AffineIntK, info dict)``.

    The column loop runs in float32 like the reference GPTQ; the Cholesky factorization in float64, except
    above ``LEAN_INPUTS`` inputs: float32 and in place, ``h``'s storage freed (pass a Hessian you no longer need).
    """
    w = w.detach().clone().float()
    h = h.to(w.device)
    lean = h.shape[0] > LEAN_INPUTS
    # large inputs: the caller's float32 Hessian is worked on in place and emptied (callers hand over their own,
    # see base.take_hessian); otherwise a float64 copy
    h = h.detach().to(torch.float32) if lean else h.detach().to(torch.float64, copy=True)
    n, k = w.shape
    dev = w.device  # --device cuda: the whole solve runs there (the format is assembled on the CPU)
    bits, gs, sym = cfg.bits, cfg.group_size, cfg.symmetric
    maxq = (1 << bits) - 1
    if not torch.isfinite(h).all():
        raise ValueError("Hessian contains NaN/Inf: calibration activations are not finite")
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    ngroups = math.ceil(k / gs)
    group_of = (torch.arange(k) // gs).tolist()
    scales = torch.empty(n, ngroups, device=dev)
    zeros = torch.empty(n, ngroups, device=dev)
    have_params = [False] * ngroups

    if cfg.act_order:
        # Static groups: parameters from the original (un-updated) weights, in natural column order.
        for g in range(ngroups):
            p = group_params(w[:, g * gs : (g + 1) * gs], bits, sym)
            scales[:, g], zeros[:, g] = p.scale, p.zero
        have_params = [True] * ngroups
        perm = torch.argsort(torch.diag(h), descending=True)
    else:
        perm = torch.arange(k, device=dev)
    perm_list = perm.tolist()
    invperm = torch.argsort(perm)
    w = w[:, perm]
    hp = h[perm]  # two steps: one matrix fewer alive at once
    if lean:
        h.untyped_storage().resize_(0)  # the caller's Hessian, handed over and already copied: freed now
    h = hp[:, perm]
    del hp

    u64, used_damp = _inverse_cholesky_upper(h, cfg.damp, in_place=lean)
    del h
    u = u64.float()
    del u64
    q_all = torch.zeros(n, k, dtype=torch.uint8, device=dev)  # integer codes 0..maxq (a quarter of float32)
    loss = torch.zeros(n, device=dev)
    bs = cfg.block_size
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        # The block's columns as contiguous rows: each column's error update is one in-place rank-1 BLAS call
        # (addr_) and the block's update of the columns to its right one in-place GEMM (addmm_), with no
        # temporaries of the weight's size (3x faster at 4096 x 4096, same codes, and less memory at 7B).
        w1 = w[:, i1:i2].t().contiguous()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = group_of[perm_list[i1 + i]]
            if not have_params[g]:
                # Group starts here (natural order): parameters from the current, updated weights.
                width = min(gs, k - (i1 + i))
                p = group_params(torch.cat([w1[i:].t(), w[:, i2:]], dim=1)[:, :width], bits, sym)
                scales[:, g], zeros[:, g] = p.scale, p.zero
                have_params[g] = True
            s, z = scales[:, g], zeros[:, g]
            wcol = w1[i]
            q = torch.clamp(torch.round(wcol / s + z), 0, maxq)
            deq = (q - z) * s
            q_all[:, i1 + i] = q
            d = u1[i, i]
            e = (wcol - deq) / d
            loss += e * e / 2
            w1[i:].addr_(u1[i, i:], e, alpha=-1)
            err1[i] = e
        if i2 < k:
            w[:, i2:].addmm_(err1.t(), u[i1:i2, i2:], alpha=-1)
    codes = q_all[:, invperm]
    fmt = assemble(codes, scales, None if sym else zeros, bits, gs)
    return fmt, {"damp": used_damp, "gptq_loss": float(loss.sum()), "dead_inputs": int(dead.sum())}


@register
class GPTQ(HessianMethod):
    name = "gptq"
    Config = GPTQConfig
    device_ready = True

    def quantize_linear(self, w, h):
        return gptq_quantize(w, h, self.config)
