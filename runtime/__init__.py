"""Packed formats, bit packing, the ``lowbit::*`` ops and artifacts (plain torch, CPU-capable).

Importing :mod:`lowbit.runtime.formats` (which every module handling packed weights does) registers the custom
ops, which must happen before a saved program is loaded. The package itself imports nothing eagerly, so the
torch-free parts (:mod:`lowbit.runtime.onnx_runtime`, the deployment runner) load without torch.
"""

_EXPORTS = {"AffineIntK": "formats", "LowRank": "formats", "dequantize_affine": "formats",
            "pack_rows": "packing", "unpack_rows": "packing"}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load(path, **kwargs):
    """Load and validate an artifact directory; see :func:`lowbit.runtime.artifact.load`."""
    from .artifact import load as _load

    return _load(path, **kwargs)


__all__ = ["AffineIntK", "LowRank", "dequantize_affine", "pack_rows", "unpack_rows", "load"]
