"""Bit packing: the one written-down bit order of lowbit.

Codes are unsigned integers in ``[0, 2**bits - 1]`` laid out as a 2-D tensor ``(rows, n)``.
Each row is packed independently into ``ceil(n * bits / 8)`` bytes (``uint8``):

* the row is a little-endian bit stream: code ``j`` occupies stream bits ``[j*bits, (j+1)*bits)``,
  least-significant bit first;
* stream bit ``t`` is bit ``t % 8`` (LSB = 0) of byte ``t // 8``;
* the unused high bits of the last byte of a row are zero.

For bits in {1, 2, 4, 8} this is the familiar "low nibble first" order (code ``2j`` in bits 0-3 and code
``2j+1`` in bits 4-7 of byte ``j`` at 4 bits), which is also the byte layout of ONNX Runtime's
``MatMulNBits`` within one block. Rows never share a byte, so a row (an output channel) can be sliced
without unpacking its neighbours.
"""

from __future__ import annotations

import torch


def packed_row_bytes(n: int, bits: int) -> int:
    """Bytes needed to pack ``n`` codes of ``bits`` bits (one row)."""
    return (n * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


_CHUNK_CODES = 1 << 22  # codes packed per step: the int64 work arrays stay ~100 MB whatever the matrix


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``(rows, n)`` into ``uint8`` ``(rows, ceil(n*bits/8))`` (see module doc)."""
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"pack_rows expects a 2-D tensor of codes, got shape {tuple(codes.shape)}")
    rows, n = codes.shape
    step = max(1, _CHUNK_CODES // max(n, 1))
    if rows > step:  # rows pack independently: a large matrix in row chunks (a 7B's 11008 x 4096 in ~11)
        return torch.cat([_pack(codes[i : i + step], bits) for i in range(0, rows, step)])
    return _pack(codes, bits)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    rows, n = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > (1 << bits) - 1):
        raise ValueError(f"codes out of range for {bits} bits: [{int(c.min())}, {int(c.max())}]")
    nbytes = packed_row_bytes(n, bits)
    if 8 % bits == 0:
        # Fast path: whole codes per byte.
        per = 8 // bits
        pad = nbytes * per - n
        if pad:
            c = torch.nn.functional.pad(c, (0, pad))
        c = c.view(rows, nbytes, per)
        shifts = torch.arange(per, dtype=torch.int64) * bits
        return (c << shifts).sum(-1).to(torch.uint8)
    # Generic path: expand to a bit stream, regroup by bytes.
    bitpos = torch.arange(bits, dtype=torch.int64)
    stream = ((c.unsqueeze(-1) >> bitpos) & 1).reshape(rows, n * bits)
    pad = nbytes * 8 - n * bits
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    stream = stream.view(rows, nbytes, 8)
    return (stream << torch.arange(8, dtype=torch.int64)).sum(-1).to(torch.uint8)


_TABLES: dict[int, torch.Tensor] = {}


def _byte_table(bits: int) -> torch.Tensor:
    """``(256, 8 // bits)`` uint8: the codes held by each byte value, in packing order."""
    if bits not in _TABLES:
        per = 8 // bits
        shifts = torch.arange(per) * bits
        _TABLES[bits] = ((torch.arange(256).unsqueeze(1) >> shifts) & ((1 << bits) - 1)).to(torch.uint8)
    return _TABLES[bits]


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: ``uint8`` ``(rows, nbytes)`` to ``uint8`` codes ``(rows, n)``."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack_rows expects a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    rows, nbytes = packed.shape
    if nbytes != packed_row_bytes(n, bits):
        raise ValueError(
            f"packed rows hold {nbytes} bytes, but {n} codes of {bits} bits need {packed_row_bytes(n, bits)}"
        )
    if 8 % bits == 0:
        # Whole codes per byte: look each byte up in a 256-entry table of its codes (fastest on CPU).
        per = 8 // bits
        codes = _byte_table(bits).to(packed.device).index_select(0, packed.reshape(-1).long())
        return codes.view(rows, nbytes * per)[:, :n]
    p = packed.to(torch.int32)
    stream = ((p.unsqueeze(-1) >> torch.arange(8, dtype=torch.int32, device=p.device)) & 1).reshape(rows, nbytes * 8)
    stream = stream[:, : n * bits].reshape(rows, n, bits)
    codes = (stream << torch.arange(bits, dtype=torch.int32, device=p.device)).sum(-1)
    return codes.to(torch.uint8)
