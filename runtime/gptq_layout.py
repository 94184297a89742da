"""The GPTQ checkpoint layout (AutoGPTQ / GPTQModel / transformers / vLLM), to and from :class:`AffineIntK`.

Per linear ``W (N out, K in)`` with ``bits`` in {2, 3, 4, 8} and groups of ``group_size`` input columns
(``G = ceil(K / group_size)``):

* ``qweight int32 (K·bits/32, N)``: the codes of each output column ``n`` along the input dimension, as
  one LSB-first bit stream cut into little-endian 32-bit words (for 2/4/8 bits: ``32/bits`` codes per word,
  code ``j`` at bits ``j·bits``; for 3 bits 32 codes span 3 words, some codes crossing a word boundary,
  which is exactly GPTQ's 3-bit packing);
* ``qzeros int32 (G, N·bits/32)``: the integer zero points of each group row, packed the same way along
  the output dimension. Format ``v1`` (``checkpoint_format: "gptq"``, what transformers and vLLM read)
  stores ``zero - 1`` modulo ``2^bits``; ``v2`` (``"gptq_v2"``, GPTQModel's internal format) stores
  ``zero``. A zero point of 0 is stored as ``2^bits - 1`` in v1: GPTQModel reads it back as 0 (its v1->v2
  conversion wraps), kernels that add 1 without wrapping read ``2^bits`` (AutoGPTQ's known asymmetric
  overflow); :func:`to_gptq` counts such groups so exporters can say so;
* ``scales fp16 (G, N)``; ``g_idx int32 (K)`` = ``k // group_size`` (no act-order permutation);
* ``W[n, k] = scales[g, n] · (q[k, n] - zero[g, n])`` with ``g = g_idx[k]``.

lowbit's own layout (:mod:`lowbit.runtime.packing`) is the same bit stream along the other axis, so
conversion is a repack, exact in both directions. Only asymmetric formats without a low-rank branch fit
(GPTQ's symmetric zero point is the integer ``2^(bits-1)``, lowbit's the half-integer midpoint).
"""

from __future__ import annotations

import torch

from .formats import AffineIntK
from .packing import pack_rows, unpack_rows

GPTQ_BITS = (2, 3, 4, 8)


class GPTQLayoutError(ValueError):
    pass


def why_not_gptq(fmt) -> str | None:
    """Why ``fmt`` cannot be written in the GPTQ layout (None if it can)."""
    if not isinstance(fmt, AffineIntK):
        return f"{getattr(fmt, 'kind', type(fmt).__name__)} weights have no GPTQ layout (uniform only)"
    if fmt.bits not in GPTQ_BITS:
        return f"{fmt.bits}-bit codes (GPTQ packs 2, 3, 4 or 8 bits)"
    if fmt.zeros is None:
        return "symmetric (lowbit's half-integer midpoint is not GPTQ's integer zero point)"
    if fmt.lowrank is not None:
        return "a low-rank (LoRA) branch, which the GPTQ layout cannot hold"
    if (fmt.in_features * fmt.bits) % 32 or (fmt.out_features * fmt.bits) % 32:
        return (f"shape ({fmt.out_features}, {fmt.in_features}) at {fmt.bits} bits does not fill whole 32-bit words "
                "along both dimensions")
    return None


def _words(rows_bytes: torch.Tensor) -> torch.Tensor:
    """uint8 (R, 4·W) -> int32 (R, W), little-endian."""
    return rows_bytes.contiguous().view(torch.int32)


def _bytes(words: torch.Tensor) -> torch.Tensor:
    return words.contiguous().view(torch.uint8)


def to_gptq(fmt: AffineIntK, version: int = 1) -> tuple[dict, int]:
    """``({qweight, qzeros, scales, g_idx}, number of zero points equal to 0)`` for one linear."""
    why = why_not_gptq(fmt)
    if why:
        raise GPTQLayoutError(why)
    if version not in (1, 2):
        raise GPTQLayoutError(f"GPTQ checkpoint format v{version}: only v1 (gptq) and v2 (gptq_v2) exist")
    k, b, g = fmt.in_features, fmt.bits, fmt.scales.shape[1]
    codes = unpack_rows(fmt.qweight, b, k)  # (N, K)
    zeros = unpack_rows(fmt.zeros, b, g)  # (N, G)
    zero_count = int((zeros == 0).sum())
    if version == 1:
        zeros = ((zeros.to(torch.int16) - 1) % (1 << b)).to(torch.uint8)
    qweight = _words(pack_rows(codes, b)).t().contiguous()  # (K·b/32, N)
    qzeros = _words(pack_rows(zeros.t().contiguous(), b))  # (G, N·b/32)
    g_idx = (torch.arange(k, dtype=torch.int32) // fmt.group_size).to(torch.int32)
    return {"qweight": qweight, "qzeros": qzeros, "scales": fmt.scales.t().contiguous().half(), "g_idx": g_idx}, \
        zero_count


def from_gptq(t: dict, bits: int, group_size: int, version: int = 1, name: str = "layer") -> AffineIntK:
    """The :class:`AffineIntK` of one GPTQ linear (``t``: ``qweight``, ``qzeros``, ``scales``, optional
    ``g_idx``). Refuses an act-order ``g_idx`` (a column permutation lowbit's format does not store)."""
    for key in ("qweight", "qzeros", "scales"):
        if key not in t:
            raise GPTQLayoutError(f"{name}: missing {key}")
    qweight, qzeros, scales = t["qweight"], t["qzeros"], t["scales"]
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise GPTQLayoutError(f"{name}: qweight/qzeros must be int32, got {qweight.dtype}/{qzeros.dtype}")
    if bits not in GPTQ_BITS:
        raise GPTQLayoutError(f"{name}: bits {bits} (expected one of {GPTQ_BITS})")
    g, n = scales.shape
    k = qweight.shape[0] * 32 // bits
    if "g_idx" in t and t["g_idx"] is not None:
        k = t["g_idx"].numel()
        want = torch.arange(k, dtype=torch.int32) // group_size
        if not torch.equal(t["g_idx"].to(torch.int32), want):
            raise GPTQLayoutError(f"{name}: g_idx is not k // group_size (act-order checkpoints are not supported)")
    if qweight.shape != ((k * bits) // 32, n) or qzeros.shape != (g, (n * bits) // 32) or g != -(-k // group_size):
        raise GPTQLayoutError(f"{name}: shapes qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, scales "
                              f"{tuple(scales.shape)} do not fit {bits}-bit, group {group_size}, K={k}, N={n}")
    codes = unpack_rows(_bytes(qweight.t()), bits, k)  # (N, K)
    zeros = unpack_rows(_bytes(qzeros), bits, n).t()  # (N, G)
    if version == 1:
        zeros = ((zeros.to(torch.int16) + 1) % (1 << bits)).to(torch.uint8)
    return AffineIntK.from_codes(codes.contiguous(), scales.t().float(), zeros.contiguous(), bits, group_size)
