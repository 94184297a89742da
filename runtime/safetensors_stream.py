"""Write a safetensors file one tensor at a time, without holding the file's contents in memory.

``safetensors.torch.save_file`` takes every tensor at once and builds the whole byte buffer; for a 7B model's
packed weights (3.4 GB) that is the whole artifact resident. Here the header is computed from shapes and dtypes,
then each tensor's bytes are written in turn; a tensor may be

* a ``torch.Tensor`` (written from memory),
* a :class:`Lazy` (shape, dtype and a function returning the tensor, called when its turn comes and released
  right after: a float tensor read from the source checkpoint),
* a tensor whose bytes already lie in a file (``byte_source(t) -> (path, offset, nbytes)``): copied file to file
  in chunks, so mmap-backed spilled tensors never become resident.

The layout is the safetensors format (8-byte little-endian header length, JSON header padded with spaces to a
multiple of 8, tensors in key order with contiguous ``data_offsets``); ``safetensors.safe_open`` reads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import torch

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
_CHUNK = 16 << 20


@dataclass
class Lazy:
    """A tensor produced only when it is written (``fn()`` must return ``dtype`` and ``shape``)."""

    shape: tuple
    dtype: torch.dtype
    fn: Callable[[], torch.Tensor]


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor (any dtype, bf16 included)."""
    t = t.detach().contiguous().cpu()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write(path, tensors: dict, byte_source: Callable | None = None) -> int:
    """Write ``tensors`` (name -> tensor or :class:`Lazy`) to ``path``; returns the file size."""
    keys = sorted(tensors)
    header, off = {}, 0
    for k in keys:
        t = tensors[k]
        shape, dtype = tuple(t.shape), t.dtype
        if dtype not in DTYPES:
            raise TypeError(f"{k}: dtype {dtype} has no safetensors code")
        n = _nbytes(shape, dtype)
        header[k] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for k in keys:
            t = tensors[k]
            want = header[k]["data_offsets"][1] - header[k]["data_offsets"][0]
            src = byte_source(t) if byte_source is not None and isinstance(t, torch.Tensor) else None
            if src is not None:
                _copy_range(src, f, want, k)
                continue
            if isinstance(t, Lazy):
                v = t.fn()
                if tuple(v.shape) != t.shape or v.dtype != t.dtype:
                    raise ValueError(f"{k}: produced {v.dtype} {tuple(v.shape)}, declared {t.dtype} {t.shape}")
                t = v
            f.write(tensor_bytes(t))
            del t
        return f.tell()


def _copy_range(src: tuple, out, nbytes: int, key: str) -> None:
    path, offset, n = src
    if n != nbytes:
        raise ValueError(f"{key}: source holds {n} bytes, header says {nbytes}")
    with open(path, "rb") as f:
        f.seek(offset)
        left = n
        while left:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                raise OSError(f"{path}: ended {left} bytes early while copying {key}")
            out.write(chunk)
            left -= len(chunk)
