"""Packed formats, bit packing, the ``lowbit::*`` ops and artifacts (plain torch, CPU-capable).

Importing this package registers the custom ops, which must happen before a saved program is loaded.
"""

from . import ops  # noqa: F401  (registers torch.ops.lowbit.*)
from .formats import AffineIntK, LowRank, dequantize_affine
from .packing import pack_rows, unpack_rows


def load(path, **kwargs):
    """Load and validate an artifact directory; see :func:`lowbit.runtime.artifact.load`."""
    from .artifact import load as _load

    return _load(path, **kwargs)


__all__ = ["AffineIntK", "LowRank", "dequantize_affine", "pack_rows", "unpack_rows", "load"]
