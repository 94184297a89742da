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

from lowbit.runtime.modules import PackedLinear, swap_module


def packed_model(art, device="cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """The artifact as an ``nn.Module`` (Hugging Face causal LM) on ``device``, float tensors in ``dtype``."""
    from lowbit.compiler.engine.rebuild import rebuild_model

    model = rebuild_model(art).to(dtype)
    for name, fmt in art.formats.items():
        bias = getattr(model.get_submodule(name), "bias", None)
        swap_module(model, name, PackedLinear(fmt, bias))
    return model.to(device).eval()
