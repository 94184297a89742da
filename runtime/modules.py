"""Compressed linears as ``nn.Module``s, and module surgery.

* :class:`PackedLinear`: a compressed linear whose forward is its format's ``lowbit::*`` op on the packed tensors
  (used by :mod:`lowbit.compiler.engine.packed_model` and by the training loop for layers that do not train);
* :func:`swap_module`: put a module at a dotted path (methods, training and model rebuilding all use it).
"""

from __future__ import annotations

import torch
from torch import nn


class PackedLinear(nn.Module):
    """A compressed linear as a module: the format's tensors are buffers (they follow ``.to(device)``),
    the forward is the format's lowbit op. Casting the module (``.half()``) leaves the packed tensors as
    stored: the kernels read the artifact's own dtypes."""

    def __init__(self, fmt, bias: torch.Tensor | None):
        super().__init__()
        from lowbit.runtime import ops

        self._meta = fmt.meta()
        self._cls = type(fmt)
        tensors = fmt.tensors()
        self._names = list(tensors)
        for k, v in tensors.items():
            self.register_buffer(k, v)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._run = {"affine_int": ops.affine_linear_from_format, "binary_residual": ops.binary_linear_from_format,
                     "vq_codebook": ops.vq_linear_from_format}[fmt.kind]
        self.fmt = fmt

    def _apply(self, fn, recurse=True):
        stored = {k: getattr(self, k).dtype for k in self._names}
        super()._apply(fn, recurse)
        for k, dt in stored.items():  # a dtype cast applies to the model's float tensors, not to the format
            t = getattr(self, k)
            if t.dtype != dt:
                setattr(self, k, t.to(dt))
        self.fmt = self._cls.from_tensors(self._meta, {k: getattr(self, k) for k in self._names})
        return self

    def forward(self, x):
        return self._run(x, self.fmt, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self._meta['kind']}, in={self._meta['in_features']}, out={self._meta['out_features']}"


def swap_module(root, rel: str, new):
    """Put ``new`` at dotted path ``rel`` under ``root``; returns the module it replaces (to swap back)."""
    parent, _, attr = rel.rpartition(".")
    holder = root.get_submodule(parent) if parent else root
    old = getattr(holder, attr)
    setattr(holder, attr, new)
    return old
