"""Packed weight formats.

A *method* (rtn, gptq, ...) decides values; a *format* stores them. Kernels, lowerings and the
artifact depend on formats only. Every format knows its tensors (``tensors()``), how to rebuild
itself from them (``from_tensors``), its dense float equivalent (``dequantize``) and its exact storage
cost (``nbytes``), from which bits per weight are counted honestly.

``AffineIntK`` -- uniform k-bit, group-wise (1 <= k <= 8)
-----------------------------------------------------------
Weight ``W`` of shape ``(N, K)`` (out_features, in_features, as ``nn.Linear``). Columns are cut into
``G = ceil(K / group_size)`` contiguous groups; the last group may be shorter when ``group_size`` does
not divide ``K`` (SmolLM2 has K = 576 with group 128: groups of 128,128,128,128,64).

* ``qweight``: ``uint8 (N, ceil(K*bits/8))`` -- codes ``q[n, k]`` in ``[0, 2**bits-1]``, packed per row
  in the order of :mod:`lowbit.runtime.packing`.
* ``scales``:  ``float16 (N, G)``.
* ``zeros``:   ``uint8 (N, ceil(G*bits/8))`` -- integer zero points ``z[n, g]`` in ``[0, 2**bits-1]``, packed
  the same way; or ``None`` for symmetric formats, where the zero point is the midpoint
  ``(2**bits - 1) / 2`` (a half-integer, so levels are symmetric about 0: at 1 bit, ``+-scale/2``).

``W[n, k] = scales[n, g] * (q[n, k] - z[n, g])`` with ``g = k // group_size``.

``BinaryResidual`` (BiLLM) and ``VQCodebook`` (ReALLM) are documented on their classes.

``LowRank`` -- optional correction ``W += B @ A``
----------------------------------------------
* ``lora_a``: ``float16 (r, K)``, ``lora_b``: ``float16 (N, r)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .packing import pack_rows, packed_row_bytes, unpack_rows

FORMAT_VERSION = 1


@dataclass
class LowRank:
    """Low-rank correction ``B @ A`` added to a weight (both fp16)."""

    lora_a: torch.Tensor  # (r, K)
    lora_b: torch.Tensor  # (N, r)

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])

    def dense(self) -> torch.Tensor:
        return self.lora_b.float() @ self.lora_a.float()


@dataclass
class AffineIntK:
    """Uniform k-bit group-wise weight (see module docstring for the exact layout)."""

    kind = "affine_int"

    bits: int
    group_size: int
    in_features: int
    out_features: int
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    lowrank: Optional[LowRank] = None

    # -- construction -------------------------------------------------------------------------
    @staticmethod
    def num_groups(in_features: int, group_size: int) -> int:
        return math.ceil(in_features / group_size)

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: Optional[torch.Tensor],
        bits: int,
        group_size: int,
        lowrank: Optional[LowRank] = None,
    ) -> "AffineIntK":
        """Pack unpacked integer ``codes (N, K)``, ``scales (N, G)`` and integer ``zeros (N, G)``.

        Formats live on the CPU whatever device computed them (``--device cuda``): the same artifact either way."""
        codes, scales = codes.cpu(), scales.cpu()
        zeros = None if zeros is None else zeros.cpu()
        n, k = codes.shape
        fmt = cls(
            bits=bits,
            group_size=group_size,
            in_features=k,
            out_features=n,
            qweight=pack_rows(codes, bits),
            scales=scales.to(torch.float16).contiguous(),
            zeros=None if zeros is None else pack_rows(zeros, bits),
            lowrank=lowrank,
        )
        fmt.validate()
        return fmt

    # -- views --------------------------------------------------------------------------------
    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def codes(self) -> torch.Tensor:
        return unpack_rows(self.qweight, self.bits, self.in_features)

    def zero_points(self) -> torch.Tensor:
        """Zero points as float ``(N, G)`` (the midpoint for symmetric formats)."""
        g = self.num_groups(self.in_features, self.group_size)
        if self.zeros is None:
            return torch.full((self.out_features, g), ((1 << self.bits) - 1) / 2.0)
        return unpack_rows(self.zeros, self.bits, g).float()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``(N, K)`` weight, low-rank correction included."""
        return dequantize_affine(
            self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.in_features,
            None if self.lowrank is None else self.lowrank.lora_a,
            None if self.lowrank is None else self.lowrank.lora_b,
        ).to(dtype)

    # -- storage ------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        if self.lowrank is not None:
            out["lora_a"] = self.lowrank.lora_a
            out["lora_b"] = self.lowrank.lora_b
        return out

    def meta(self) -> dict:
        return {
            "kind": self.kind,
            "version": FORMAT_VERSION,
            "bits": self.bits,
            "group_size": self.group_size,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "symmetric": self.symmetric,
            "rank": 0 if self.lowrank is None else self.lowrank.rank,
        }

    @classmethod
    def from_tensors(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "AffineIntK":
        lowrank = None
        if "lora_a" in tensors:
            lowrank = LowRank(tensors["lora_a"], tensors["lora_b"])
        fmt = cls(
            bits=int(meta["bits"]),
            group_size=int(meta["group_size"]),
            in_features=int(meta["in_features"]),
            out_features=int(meta["out_features"]),
            qweight=tensors["qweight"],
            scales=tensors["scales"],
            zeros=tensors.get("zeros"),
            lowrank=lowrank,
        )
        fmt.validate()
        return fmt

    def expected_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        n, k = self.out_features, self.in_features
        g = self.num_groups(k, self.group_size)
        out = {
            "qweight": ((n, packed_row_bytes(k, self.bits)), torch.uint8),
            "scales": ((n, g), torch.float16),
        }
        if self.zeros is not None:
            out["zeros"] = ((n, packed_row_bytes(g, self.bits)), torch.uint8)
        if self.lowrank is not None:
            r = self.lowrank.rank
            out["lora_a"] = ((r, k), torch.float16)
            out["lora_b"] = ((n, r), torch.float16)
        return out

    def validate(self) -> None:
        """Raise ``ValueError`` naming the tensor whose shape or dtype disagrees with the header."""
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be in 1..8, got {self.bits}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        have = self.tensors()
        for name, (shape, dtype) in self.expected_shapes().items():
            t = have[name]
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(
                    f"{name}: expected {dtype} {shape} for a {self.bits}-bit g{self.group_size} "
                    f"{self.out_features}x{self.in_features} weight, got {t.dtype} {tuple(t.shape)}"
                )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes() / (self.in_features * self.out_features)

    def paper_bits_per_weight(self) -> float:
        """The usual narrow count: code bits only."""
        return float(self.bits)


def dequantize_affine(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    in_features: int,
    lora_a: Optional[torch.Tensor] = None,
    lora_b: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Readable reference dequantization of an :class:`AffineIntK` weight to float32 ``(N, K)``.

    Large weights go in row chunks (rows are independent), so the temporaries stay ~50 MB instead of ~4x the
    weight (a 7B's gate_proj: 180 MB of output, 700 MB of temporaries in one piece)."""
    n = scales.shape[0]
    step = max(1, (1 << 22) // max(in_features, 1))
    if n > step:
        out = torch.empty(n, in_features, device=scales.device)
        for i in range(0, n, step):
            out[i : i + step] = dequantize_affine(qweight[i : i + step], scales[i : i + step],
                                                  None if zeros is None else zeros[i : i + step], bits, group_size,
                                                  in_features)
        return out if lora_a is None else out + lora_b.float() @ lora_a.float()
    g = scales.shape[1]
    codes = unpack_rows(qweight, bits, in_features).float()
    if zeros is None:
        z = torch.full((n, g), ((1 << bits) - 1) / 2.0, device=scales.device)
    else:
        z = unpack_rows(zeros, bits, g).float()
    padded = g * group_size
    if padded != in_features:
        codes = torch.nn.functional.pad(codes, (0, padded - in_features))
    w = (codes.view(n, g, group_size) - z.unsqueeze(-1)) * scales.float().unsqueeze(-1)
    w = w.reshape(n, padded)[:, :in_features]
    if lora_a is not None:
        w = w + lora_b.float() @ lora_a.float()
    return w


@dataclass
class BinaryResidual:
    """BiLLM binary-residual weight (``lowbit::binary_linear``).

    ``W (N, K)``, columns in blocks of ``block_size``. Each weight belongs to one of three parts:
    *salient* (whole columns, chosen per block), *concentrated* or *sparse* (the two halves of the
    non-salient weights of a row-block). Tensors:

    * ``signs``          ``uint8 (N, ceil(K/8))``: sign plane of every weight (bit 1 = +1, 0 = -1),
      packed per row LSB first (:mod:`lowbit.runtime.packing`);
    * ``residual_signs`` ``uint8 (N, ceil(S/8))``: second-order sign plane of the ``S`` salient columns
      (in increasing column order);
    * ``salient_cols``   ``int32 (S,)``: indices of the salient columns, increasing;
    * ``group``          ``uint8 (N, ceil((K-S)/8))``: for the non-salient columns in increasing order,
      bit 1 = sparse group, 0 = concentrated group;
    * ``alphas``         ``float16 (N, nblocks, 4)``: per row-block scales of the parts
      ``[salient order 1, salient order 2, concentrated, sparse]``;
    * ``mus``            ``float16 (N, nblocks, 4)`` or absent: per row-block means (mean-shifted variant);
    * ``outlier_cols``   ``int32 (R,)`` or absent: increasing indices of columns kept in fp16 (input channels
      with massive activations, an extension of the paper: see :mod:`lowbit.passes.methods.billm`);
      disjoint from ``salient_cols``. Their bits in ``signs``/``group`` are present but unused;
    * ``outlier_vals``   ``float16 (N, R)`` or absent: the values of those columns.

    Dequantization, with ``s = +-1`` from ``signs``, ``r = +-1`` from ``residual_signs`` and ``c`` the
    part of the weight: ``W = alpha[c]*s + mu[c]``, plus ``alpha[1]*r + mu[1]`` for salient weights;
    outlier columns are then overwritten with ``outlier_vals``.
    """

    kind = "binary_residual"

    block_size: int
    in_features: int
    out_features: int
    signs: torch.Tensor
    residual_signs: torch.Tensor
    salient_cols: torch.Tensor
    group: torch.Tensor
    alphas: torch.Tensor
    mus: Optional[torch.Tensor] = None
    outlier_cols: Optional[torch.Tensor] = None
    outlier_vals: Optional[torch.Tensor] = None

    @classmethod
    def from_planes(cls, signs, residual_signs, salient, group, alphas, mus, block_size, outliers=None,
                    outlier_vals=None):
        """Pack bool planes: ``signs (N,K)``, ``residual_signs (N,S)``, ``salient (K,)``, ``group (N,K)``;
        ``outliers (K,)`` bool and ``outlier_vals (N,R)`` for fp16 columns (optional)."""
        n, k = signs.shape
        has_out = outliers is not None and bool(outliers.any())
        fmt = cls(
            block_size=block_size, in_features=k, out_features=n,
            signs=pack_rows(signs.to(torch.uint8), 1),
            residual_signs=pack_rows(residual_signs.to(torch.uint8), 1),
            salient_cols=torch.nonzero(salient).flatten().to(torch.int32),
            group=pack_rows(group[:, ~salient].to(torch.uint8), 1),
            alphas=alphas.to(torch.float16).contiguous(),
            mus=None if mus is None else mus.to(torch.float16).contiguous(),
            outlier_cols=torch.nonzero(outliers).flatten().to(torch.int32) if has_out else None,
            outlier_vals=outlier_vals.to(torch.float16).contiguous() if has_out else None,
        )
        fmt.validate()
        return fmt

    @property
    def num_salient(self) -> int:
        return int(self.salient_cols.numel())

    @property
    def num_outliers(self) -> int:
        return 0 if self.outlier_cols is None else int(self.outlier_cols.numel())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_binary(self.signs, self.residual_signs, self.salient_cols, self.group, self.alphas,
                                 self.mus, self.block_size, self.in_features, self.outlier_cols,
                                 self.outlier_vals).to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"signs": self.signs, "residual_signs": self.residual_signs, "salient_cols": self.salient_cols,
               "group": self.group, "alphas": self.alphas}
        if self.mus is not None:
            out["mus"] = self.mus
        if self.outlier_cols is not None:
            out["outlier_cols"] = self.outlier_cols
            out["outlier_vals"] = self.outlier_vals
        return out

    def meta(self) -> dict:
        return {"kind": self.kind, "version": FORMAT_VERSION, "block_size": self.block_size,
                "in_features": self.in_features, "out_features": self.out_features,
                "num_salient": self.num_salient, "mean_shift": self.mus is not None,
                "num_outliers": self.num_outliers,
                "bits": 1, "group_size": self.block_size}

    @classmethod
    def from_tensors(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "BinaryResidual":
        fmt = cls(block_size=int(meta["block_size"]), in_features=int(meta["in_features"]),
                  out_features=int(meta["out_features"]), signs=tensors["signs"],
                  residual_signs=tensors["residual_signs"], salient_cols=tensors["salient_cols"],
                  group=tensors["group"], alphas=tensors["alphas"], mus=tensors.get("mus"),
                  outlier_cols=tensors.get("outlier_cols"), outlier_vals=tensors.get("outlier_vals"))
        if (fmt.outlier_cols is None) != (fmt.outlier_vals is None):
            raise ValueError("outlier_cols and outlier_vals must be stored together")
        if fmt.num_outliers != int(meta.get("num_outliers", fmt.num_outliers)):
            raise ValueError(f"outlier_cols: {fmt.num_outliers} columns, header says {meta['num_outliers']}")
        if fmt.num_salient != int(meta.get("num_salient", fmt.num_salient)):
            raise ValueError(f"salient_cols: {fmt.num_salient} columns, header says {meta['num_salient']}")
        fmt.validate()
        return fmt

    def expected_shapes(self) -> dict:
        n, k, s = self.out_features, self.in_features, self.num_salient
        nb = math.ceil(k / self.block_size)
        out = {"signs": ((n, packed_row_bytes(k, 1)), torch.uint8),
               "residual_signs": ((n, packed_row_bytes(s, 1)), torch.uint8),
               "salient_cols": ((s,), torch.int32),
               "group": ((n, packed_row_bytes(k - s, 1)), torch.uint8),
               "alphas": ((n, nb, 4), torch.float16)}
        if self.mus is not None:
            out["mus"] = ((n, nb, 4), torch.float16)
        if self.outlier_cols is not None:
            r = self.num_outliers
            out["outlier_cols"] = ((r,), torch.int32)
            out["outlier_vals"] = ((n, r), torch.float16)
        return out

    def validate(self) -> None:
        have = self.tensors()
        for name, (shape, dtype) in self.expected_shapes().items():
            t = have[name]
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"{name}: expected {dtype} {shape} for a binary {self.out_features}x"
                                 f"{self.in_features} weight, got {t.dtype} {tuple(t.shape)}")
        sc = self.salient_cols
        if sc.numel() and (int(sc.min()) < 0 or int(sc.max()) >= self.in_features or bool((sc[1:] <= sc[:-1]).any())):
            raise ValueError("salient_cols must be increasing column indices within the weight")
        oc = self.outlier_cols
        if oc is not None and oc.numel():
            if int(oc.min()) < 0 or int(oc.max()) >= self.in_features or bool((oc[1:] <= oc[:-1]).any()):
                raise ValueError("outlier_cols must be increasing column indices within the weight")
            if bool(torch.isin(oc, sc).any()):
                raise ValueError("outlier_cols and salient_cols must be disjoint")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes() / (self.in_features * self.out_features)

    def paper_bits_per_weight(self) -> float:
        """BiLLM's own count (Eq. 14, N_param): sign bits only, 2 for salient weights, 1 otherwise
        (16 for fp16 outlier columns, which the paper does not have)."""
        return 1.0 + (self.num_salient + 15 * self.num_outliers) / self.in_features


def dequantize_binary(signs, residual_signs, salient_cols, group, alphas, mus, block_size, in_features,
                      outlier_cols=None, outlier_vals=None):
    """Readable reference dequantization of a :class:`BinaryResidual` weight to float32 ``(N, K)``.

    Non-salient weights: ``alpha*s + mu`` of their group (concentrated or sparse); the few salient
    columns are then overwritten with ``alpha0*s + mu0 + alpha1*r + mu1``.
    """
    n, k = signs.shape[0], in_features
    s = unpack_rows(signs, 1, k).float() * 2 - 1
    sal = salient_cols.long()
    nsal = int(sal.numel())
    non_sal_mask = torch.ones(k, dtype=torch.bool)
    non_sal_mask[sal] = False
    non_sal = torch.nonzero(non_sal_mask).flatten()

    def per_column(t):  # (N, nblocks) -> (N, K): each block's value repeated over its columns
        return t.float().repeat_interleave(block_size, dim=1)[:, :k]

    sparse = torch.zeros(n, k, dtype=torch.uint8).index_copy_(1, non_sal, unpack_rows(group, 1, k - nsal)).bool()
    alpha = torch.where(sparse, per_column(alphas[..., 3]), per_column(alphas[..., 2]))
    w = alpha * s
    if mus is not None:
        w += torch.where(sparse, per_column(mus[..., 3]), per_column(mus[..., 2]))
    if nsal:
        blk = sal // block_size
        r = unpack_rows(residual_signs, 1, nsal).float() * 2 - 1
        a = alphas.float()[:, blk]  # (N, S, 4)
        ws = a[..., 0] * s[:, sal] + a[..., 1] * r
        if mus is not None:
            m = mus.float()[:, blk]
            ws += m[..., 0] + m[..., 1]
        w[:, sal] = ws
    if outlier_cols is not None:
        w[:, outlier_cols.long()] = outlier_vals.float()
    return w


@dataclass
class VQCodebook:
    """Vector-quantized weight with one codebook per matrix (``lowbit::vq_linear``; ReALLM's residual).

    ``W (N, K)``. The columns are stored in the order ``perm`` (stored column ``j`` is original column
    ``perm[j]``; no ``perm``: the identity). In stored order each row is cut into ``K / vec_dim`` vectors of
    ``vec_dim`` consecutive columns; each vector is an entry of the codebook, and every stored column is
    scaled by its row's scale for the group of ``group_size`` stored columns it falls in::

        Wp[n, j] = scales[n, j // group_size] * codebook[code[n, j // vec_dim], j % vec_dim]
        W[n, perm[j]] = Wp[n, j]            (+ the optional low-rank correction B @ A, original order)

    Tensors:

    * ``codes``    ``uint8 (N, ceil((K/vec_dim) * index_bits / 8))``: codebook indices, packed per row in the
      order of :mod:`lowbit.runtime.packing` (``1 <= index_bits <= 8``);
    * ``codebook`` ``float16 (2**index_bits, vec_dim)``;
    * ``scales``   ``float16 (N, ceil(K / group_size))``;
    * ``perm``     ``int16 (K,)`` (``int32`` when ``K > 32767``) or absent: a permutation of ``0..K-1``;
    * ``lora_a``   ``float16 (r, K)`` and ``lora_b`` ``float16 (N, r)``, or absent.

    ``K`` must be a multiple of ``vec_dim``. Bits per weight: ``index_bits / vec_dim`` for the codes plus
    scales, codebook, permutation and low-rank factors, all counted by :meth:`nbytes`.
    """

    kind = "vq_codebook"

    index_bits: int
    vec_dim: int
    group_size: int
    in_features: int
    out_features: int
    codes: torch.Tensor
    codebook: torch.Tensor
    scales: torch.Tensor
    perm: Optional[torch.Tensor] = None
    lowrank: Optional[LowRank] = None

    @classmethod
    def from_indices(cls, indices, codebook, scales, index_bits: int, group_size: int, perm=None, lowrank=None):
        """Pack integer ``indices (N, K/vec_dim)``; ``codebook (2**index_bits, vec_dim)``, ``scales (N, G)``."""
        n, nv = indices.shape
        d = int(codebook.shape[1])
        fmt = cls(index_bits=index_bits, vec_dim=d, group_size=group_size, in_features=nv * d, out_features=n,
                  codes=pack_rows(indices, index_bits), codebook=codebook.to(torch.float16).contiguous(),
                  scales=scales.to(torch.float16).contiguous(),
                  perm=None if perm is None else perm.to(_perm_dtype(nv * d)).contiguous(),
                  lowrank=None if lowrank is None else LowRank(lowrank.lora_a.to(torch.float16).contiguous(),
                                                               lowrank.lora_b.to(torch.float16).contiguous()))
        fmt.validate()
        return fmt

    @property
    def bits(self) -> int:  # the code bits a weight would have without vectors (reports, rewrite counts)
        return self.index_bits

    def indices(self) -> torch.Tensor:
        return unpack_rows(self.codes, self.index_bits, self.in_features // self.vec_dim)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``(N, K)`` weight in the original column order, low-rank correction included."""
        lr = self.lowrank
        return dequantize_vq(self.codes, self.codebook, self.scales, self.perm, self.index_bits, self.vec_dim,
                             self.group_size, self.in_features, None if lr is None else lr.lora_a,
                             None if lr is None else lr.lora_b).to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"codes": self.codes, "codebook": self.codebook, "scales": self.scales}
        if self.perm is not None:
            out["perm"] = self.perm
        if self.lowrank is not None:
            out["lora_a"] = self.lowrank.lora_a
            out["lora_b"] = self.lowrank.lora_b
        return out

    def meta(self) -> dict:
        return {"kind": self.kind, "version": FORMAT_VERSION, "index_bits": self.index_bits,
                "vec_dim": self.vec_dim, "group_size": self.group_size, "in_features": self.in_features,
                "out_features": self.out_features, "permuted": self.perm is not None,
                "rank": 0 if self.lowrank is None else self.lowrank.rank, "bits": self.index_bits}

    @classmethod
    def from_tensors(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "VQCodebook":
        lowrank = LowRank(tensors["lora_a"], tensors["lora_b"]) if "lora_a" in tensors else None
        fmt = cls(index_bits=int(meta["index_bits"]), vec_dim=int(meta["vec_dim"]),
                  group_size=int(meta["group_size"]), in_features=int(meta["in_features"]),
                  out_features=int(meta["out_features"]), codes=tensors["codes"], codebook=tensors["codebook"],
                  scales=tensors["scales"], perm=tensors.get("perm"), lowrank=lowrank)
        if bool(meta.get("permuted", fmt.perm is not None)) != (fmt.perm is not None):
            raise ValueError("perm: the header and the stored tensors disagree on whether columns are permuted")
        if int(meta.get("rank", fmt.lowrank.rank if fmt.lowrank else 0)) != (fmt.lowrank.rank if fmt.lowrank else 0):
            raise ValueError(f"lora_a: rank disagrees with the header's rank {meta['rank']}")
        fmt.validate()
        return fmt

    def expected_shapes(self) -> dict:
        n, k, d = self.out_features, self.in_features, self.vec_dim
        out = {"codes": ((n, packed_row_bytes(k // d, self.index_bits)), torch.uint8),
               "codebook": ((1 << self.index_bits, d), torch.float16),
               "scales": ((n, math.ceil(k / self.group_size)), torch.float16)}
        if self.perm is not None:
            out["perm"] = ((k,), _perm_dtype(k))
        if self.lowrank is not None:
            r = self.lowrank.rank
            out["lora_a"] = ((r, k), torch.float16)
            out["lora_b"] = ((n, r), torch.float16)
        return out

    def validate(self) -> None:
        if not 1 <= self.index_bits <= 8:
            raise ValueError(f"index_bits must be in 1..8, got {self.index_bits}")
        if self.vec_dim < 1 or self.in_features % self.vec_dim:
            raise ValueError(f"vec_dim {self.vec_dim} must divide in_features {self.in_features}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        have = self.tensors()
        for name, (shape, dtype) in self.expected_shapes().items():
            t = have[name]
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"{name}: expected {dtype} {shape} for a VQ {self.out_features}x{self.in_features} "
                                 f"weight (d={self.vec_dim}, {self.index_bits}-bit indices, g{self.group_size}), "
                                 f"got {t.dtype} {tuple(t.shape)}")
        if self.perm is not None and not torch.equal(torch.sort(self.perm.long()).values,
                                                     torch.arange(self.in_features)):
            raise ValueError(f"perm is not a permutation of 0..{self.in_features - 1}")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes() / (self.in_features * self.out_features)

    def paper_bits_per_weight(self) -> float:
        """The papers' narrow count: index bits per weight only (ReALLM and LQ-LoRA leave the low-rank
        part out; scales, codebook and permutation are left out here as for the other formats)."""
        return self.index_bits / self.vec_dim


def _perm_dtype(k: int) -> torch.dtype:
    return torch.int16 if k <= 32767 else torch.int32


def dequantize_vq(codes, codebook, scales, perm, index_bits: int, vec_dim: int, group_size: int, in_features: int,
                  lora_a=None, lora_b=None) -> torch.Tensor:
    """Readable reference dequantization of a :class:`VQCodebook` weight to float32 ``(N, K)``."""
    n, k = codes.shape[0], in_features
    idx = unpack_rows(codes, index_bits, k // vec_dim).long()
    wp = codebook.float()[idx].reshape(n, k)  # (N, K/d, d) -> (N, K), stored column order
    col_group = torch.arange(k, device=scales.device) // group_size
    wp = wp * scales.float()[:, col_group]
    if perm is None:
        w = wp
    else:
        w = torch.empty_like(wp)
        w[:, perm.long()] = wp
    if lora_a is not None:
        w = w + lora_b.float() @ lora_a.float()
    return w


FORMATS = {AffineIntK.kind: AffineIntK, BinaryResidual.kind: BinaryResidual, VQCodebook.kind: VQCodebook}


def format_from_meta(meta: dict, tensors: dict[str, torch.Tensor]):
    kind = meta.get("kind")
    if kind not in FORMATS:
        raise ValueError(f"unknown format kind {kind!r} (known: {sorted(FORMATS)})")
    if int(meta.get("version", -1)) > FORMAT_VERSION:
        raise ValueError(f"format {kind} version {meta.get('version')} is newer than this lowbit ({FORMAT_VERSION})")
    return FORMATS[kind].from_tensors(meta, tensors)
