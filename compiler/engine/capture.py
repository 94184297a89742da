"""Capture: ``torch.export`` of a causal LM as ``input_ids (batch, seq) -> logits``.

Batch and sequence length are dynamic. The wrapper holds the Hugging Face model as attribute
``model``, so graph module paths are ``model.<hf module name>`` (the passes strip that prefix).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim

from lowbit.errors import LowbitError


class CausalLMLogits(nn.Module):
    """``forward(input_ids) -> logits`` without a KV cache (the shape every lowering starts from)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def example_inputs(vocab: int = 100) -> tuple[torch.Tensor]:
    # Batch 2 / length 16 avoid 0/1 specialization so both dims stay symbolic.
    return (torch.randint(0, min(vocab, 100), (2, 16), generator=torch.Generator().manual_seed(0)),)  # stored


DYNAMIC = {"input_ids": {0: Dim.AUTO, 1: Dim.AUTO}}


def capture(model: nn.Module) -> torch.export.ExportedProgram:
    """Export the float model; raises :class:`LowbitError` with the exporter's reason on failure."""
    wrapper = CausalLMLogits(model).eval()
    try:
        with torch.no_grad():
            return torch.export.export(wrapper, example_inputs(), dynamic_shapes=DYNAMIC)
    except Exception as e:
        raise LowbitError(f"torch.export could not capture {type(model).__name__}: {type(e).__name__}: {e}") from e


def recapture(gm: torch.fx.GraphModule) -> torch.export.ExportedProgram:
    """Re-export a rewritten graph module into an ``ExportedProgram`` (what the artifact stores)."""
    with torch.no_grad():
        return torch.export.export(gm, example_inputs(), dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},))
