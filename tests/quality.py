"""Quality measures for method tests: the objectives the methods optimize, measured independently.

End-to-end logit errors of a random 2-block model compare methods by a number none of them optimizes, and
which one wins can flip with package versions or CPU kernels. These measure what each method does target:

- :func:`block_output_error`: for every decoder block, the relative squared error of the block's output
  with the calibrated weights against the float block, both fed the same float inputs captured from
  held-out windows (Block-AP, ApiQ ``bw``, ReALLM's block fine-tuning minimize this per block);
- :func:`layer_output_error`: ``sum tr(dW H dW^T) / sum tr(W H W^T)`` over the linears, with ``H = X^T X``
  of each linear's float inputs on held-out windows (GPTQ, ReALLM's budgeted choice, ApiQ ``lw``).
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.compiler.engine.models import find_blocks, is_linear_like, set_linear_weight


def _dense_weight(m: nn.Module) -> torch.Tensor:
    w = m.weight.detach().float()
    return w.t() if type(m).__name__ == "Conv1D" else w


class _Swapped:
    """Context: the calibrated (dequantized) weights in place of the float ones, restored on exit."""

    def __init__(self, model: nn.Module, results: dict):
        self.mods = dict(model.named_modules())
        self.results = results

    def __enter__(self):
        self.saved = {n: self.mods[n].weight.detach().clone() for n in self.results}
        for n, f in self.results.items():
            set_linear_weight(self.mods[n], f.dequantize())
        return self

    def __exit__(self, *exc):
        for n, w in self.saved.items():
            self.mods[n].weight.data.copy_(w)


@torch.no_grad()
def block_output_error(model: nn.Module, results: dict, ids: torch.Tensor) -> list[float]:
    """Per block: ``||block_q(x) - block(x)||^2 / ||block(x)||^2`` on the float inputs ``x`` of ``ids``."""
    _, blocks = find_blocks(model)
    captured = []

    def hook(mod, args, kwargs, out):
        captured.append((mod, args, kwargs, (out[0] if isinstance(out, tuple) else out).clone()))

    handles = [b.register_forward_hook(hook, with_kwargs=True) for b in blocks]
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    errs = []
    with _Swapped(model, results):
        for mod, args, kwargs, ref in captured:
            out = mod(*args, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            errs.append(float((out - ref).pow(2).sum() / ref.pow(2).sum()))
    return errs


@torch.no_grad()
def layer_hessians(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``X^T X / n`` of every linear's float inputs on ``ids``."""
    hs: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in model.named_modules():
        if is_linear_like(m):
            def hook(mod, args, out, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                hs[name] = hs.get(name, 0) + x.t() @ x / x.shape[0]
            handles.append(m.register_forward_hook(hook))
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return hs


def layer_output_error(model: nn.Module, results: dict, hessians: dict[str, torch.Tensor]) -> float:
    """``sum tr(dW H dW^T) / sum tr(W H W^T)`` over the calibrated linears (a fixed-Hessian output error)."""
    mods = dict(model.named_modules())
    num = den = 0.0
    for n, f in results.items():
        w, h = _dense_weight(mods[n]), hessians[n]
        dw = f.dequantize().float() - w
        num += float(((dw @ h) * dw).sum())
        den += float(((w @ h) * w).sum())
    return num / den
