"""An artifact as an eager Hugging Face model on any device: every compressed linear runs its lowbit op.

``packed_model(art, device="cuda", dtype=torch.float16)`` rebuilds the architecture from the artifact's
``model_config/`` with its float tensors (embeddings, norms, uncompressed layers) in ``dtype`` and puts a
:class:`PackedLinear` at every compressed linear. The packed tensors keep their own dtypes (uint8 codes,
fp16 scales) and only move device, so on CUDA the ops run the Triton kernels (:mod:`lowbit.kernels`) on
exactly the bytes of ``packed.safetensors``; on CPU they run the eager reference. Unlike ``program.pt2``
(an exported CPU graph) the model takes any device and Hugging Face's own key/value cache, which is what a
decode benchmark or a serving loop needs.
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


def packed_model(art, device="cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """The artifact as an ``nn.Module`` (Hugging Face causal LM) on ``device``, float tensors in ``dtype``."""
    from lowbit.passes.methods.base import swap_module

    from .kv_export import rebuild_model

    model = rebuild_model(art).to(dtype)
    for name, fmt in art.formats.items():
        bias = getattr(model.get_submodule(name), "bias", None)
        swap_module(model, name, PackedLinear(fmt, bias))
    return model.to(device).eval()
