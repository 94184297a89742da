"""Building blocks shared by the quantize-plus-LoRA methods (``apiq`` and its baselines).

* :class:`LWCQuantizer` -- learnable weight clipping (OmniQuant's LWC, used by ApiQ): two logits per
  (row, group), ``gamma_up``/``gamma_low``, clip the group's range to ``sigmoid(gamma) * max/min``;
  fake quantization with straight-through rounding; :meth:`LWCQuantizer.freeze` turns the learned
  clipping into the stored :class:`~lowbit.runtime.formats.AffineIntK` codes, scales and zeros.
* :class:`QuantLoRALinear` -- a training-time stand-in for one linear: frozen float weight, its
  quantizer, and LoRA factors ``A (r, K)``, ``B (N, r)``; ``y = x Q(W)^T + s * (x A^T) B^T + bias``.
* :func:`loftq_init` -- LoftQ's data-free alternation (quantize ``W - BA``, then best rank-r fit of
  the residual by SVD).

Conventions follow :mod:`lowbit.passes.methods.quant` so that what is trained is exactly what is
stored: the asymmetric range always contains 0 (``[min(w, 0), max(w, 0)]`` before clipping), integer
zero points, fp16 scales; symmetric formats use the half-integer midpoint.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.runtime.formats import AffineIntK, LowRank


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


class LWCQuantizer(nn.Module):
    """Group-wise uniform fake quantizer of a fixed ``(N, K)`` weight with learnable clipping."""

    def __init__(self, n: int, k: int, bits: int, group_size: int, symmetric: bool, init: float = 4.0):
        super().__init__()
        self.n, self.k, self.bits, self.group_size, self.symmetric = n, k, bits, group_size, symmetric
        self.groups = math.ceil(k / group_size)
        self.maxq = (1 << bits) - 1
        # sigmoid(4.0) = 0.982: ApiQ/OmniQuant start just inside the full range.
        self.gamma_up = nn.Parameter(torch.full((n, self.groups), init))
        self.gamma_low = nn.Parameter(torch.full((n, self.groups), init))

    def _grouped(self, w: torch.Tensor) -> torch.Tensor:
        pad = self.groups * self.group_size - self.k
        if pad:  # padding with zeros changes no range: 0 is always inside it (see module docstring)
            w = torch.nn.functional.pad(w, (0, pad))
        return w.reshape(self.n, self.groups, self.group_size)

    def _params(self, wg: torch.Tensor, fp16_scale: bool):
        up = torch.sigmoid(self.gamma_up)
        low = torch.sigmoid(self.gamma_low)
        wmax = wg.amax(-1).clamp(min=0) * up
        wmin = wg.amin(-1).clamp(max=0) * low
        if self.symmetric:
            scale = torch.maximum(wmax, -wmin) / (self.maxq / 2.0)
        else:
            scale = (wmax - wmin) / self.maxq
        scale = scale.clamp(1e-5, 1e4)
        if fp16_scale:
            scale = scale.half().float()
        if self.symmetric:
            zero = torch.full_like(scale, self.maxq / 2.0)
        else:
            # ApiQ rounds the zero point without a straight-through path: no gradient through it.
            zero = torch.round(-wmin / scale).clamp(0, self.maxq).detach()
        return scale, zero

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """Fake-quantized ``w`` (differentiable w.r.t. the clipping logits)."""
        wg = self._grouped(w)
        scale, zero = self._params(wg, fp16_scale=False)
        q = torch.clamp(_round_ste(wg / scale[..., None] + zero[..., None]), 0, self.maxq)
        deq = (q - zero[..., None]) * scale[..., None]
        return deq.reshape(self.n, -1)[:, : self.k]

    @torch.no_grad()
    def freeze(self, w: torch.Tensor, lowrank: LowRank | None = None) -> AffineIntK:
        """The packed format the learned clipping gives (fp16 scales first, then the codes for them)."""
        wg = self._grouped(w.float())
        scale, zero = self._params(wg, fp16_scale=True)
        q = torch.clamp(torch.round(wg / scale[..., None] + zero[..., None]), 0, self.maxq)
        codes = q.reshape(self.n, -1)[:, : self.k]
        return AffineIntK.from_codes(codes.to(torch.uint8), scale, None if self.symmetric else zero.to(torch.uint8),
                                     self.bits, self.group_size, lowrank=lowrank)


def kaiming_lora(r: int, n: int, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's default LoRA start: ``A`` Kaiming-uniform (a = sqrt 5, i.e. U(-1/sqrt K, 1/sqrt K)), ``B = 0``."""
    bound = 1.0 / math.sqrt(k)
    a = (torch.rand(r, k, generator=generator) * 2 - 1) * bound
    return a, torch.zeros(n, r)


class QuantLoRALinear(nn.Module):
    """Training stand-in for one linear: ``x Q(W)^T + scaling * (x A^T) B^T + bias``.

    ``W`` (float, ``(N, K)``) and ``bias`` are frozen; trainable: the quantizer's clipping (if it
    has any parameters) and the LoRA factors (if ``rank > 0``)."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None, quantizer: LWCQuantizer,
                 lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, scaling: float):
        super().__init__()
        self.register_buffer("weight_fp", w.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.quantizer = quantizer
        self.lora_a = None if lora_a is None else nn.Parameter(lora_a.float().clone())
        self.lora_b = None if lora_b is None else nn.Parameter(lora_b.float().clone())
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x, self.quantizer(self.weight_fp), self.bias)
        if self.lora_a is not None:
            y = y + self.scaling * torch.nn.functional.linear(torch.nn.functional.linear(x, self.lora_a), self.lora_b)
        return y

    def lowrank(self) -> LowRank | None:
        """The LoRA branch as stored: fp16 ``A`` and ``B * scaling`` (the scaling folded into B)."""
        if self.lora_a is None:
            return None
        return LowRank(self.lora_a.detach().half(), (self.lora_b.detach() * self.scaling).half())

    def freeze(self) -> AffineIntK:
        return self.quantizer.freeze(self.weight_fp, self.lowrank())


def rank_r(residual: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``r`` factors ``(A (r, K), B (N, r))`` of ``residual`` (truncated SVD, sqrt(S) on both)."""
    u, s, vh = torch.linalg.svd(residual.double(), full_matrices=False)
    root = s[:r].sqrt()
    return (root[:, None] * vh[:r]).float(), (u[:, :r] * root[None]).float()


def loftq_init(w: torch.Tensor, r: int, bits: int, group_size: int, symmetric: bool, iters: int):
    """LoftQ (Li et al. 2023), data-free: ``Q_t = quant(W - B A)``, ``(A, B) = SVD_r(W - Q_t)``, ``iters`` times.

    Returns the :class:`AffineIntK` with its fp16 low-rank branch; the quantizer is round-to-nearest
    with lowbit's group convention, the rank-r fit uses the fp16-rounded factors' residual."""
    from .quant import rtn_quantize

    w = w.float()
    a = torch.zeros(r, w.shape[1])
    b = torch.zeros(w.shape[0], r)
    for _ in range(max(iters, 1)):
        q = rtn_quantize(w - b @ a, bits, group_size, symmetric)
        a, b = rank_r(w - q.dequantize(), r)
    q.lowrank = LowRank(a.half(), b.half())
    q.validate()
    return q
