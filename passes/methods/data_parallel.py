"""Block training on calibration windows shared out by ``torchrun``: one process's steps, gradients summed.

Under ``torchrun --nproc-per-node N`` rank ``r`` holds the windows ``r, r + N, r + 2N, ...`` of the one-process
list (``World.shard``), as its local positions ``0, 1, 2, ...``. The training loops of ApiQ, EfficientQAT's Block-AP
and ReALLM's block fine-tuning keep indexing the one-process list (``WindowShard.n`` windows, the same batches in
the same order on every rank, drawn from the same seeded generators); for each batch a rank computes the loss on
the windows of it that it holds, weighted by their share of the batch, and the gradients (with the loss value)
are summed over the ranks before the optimizer step. A batch's loss is the mean of equal-sized windows' losses,
so the summed gradient is the one-process gradient (up to float summation order) and every rank takes the same
step. A rank holding none of a batch contributes zeros; with batches of one window only one rank computes per
step (use batches of at least N windows to keep every rank busy).

In one process (no torchrun) every method is unchanged: ``n`` is the local count and nothing is summed.
"""

from __future__ import annotations

import torch


def active_world(ctx):
    """The ``torchrun`` world this calibration shares its work over, or ``None`` in one process."""
    world = getattr(getattr(ctx, "engine", None), "world", None)
    return world if world is not None and world.enabled else None


class WindowShard:
    """This process's share of the calibration windows, addressed by one-process window index."""

    def __init__(self, ctx):
        self.world = active_world(ctx)
        n_local = len(ctx.quant_inputs)
        self.n = self.world.sum_int(n_local) if self.world else n_local

    @property
    def rank(self) -> int:
        return self.world.rank if self.world else 0

    @property
    def size(self) -> int:
        return self.world.size if self.world else 1

    def mine(self, idx) -> list[int]:
        """Local positions of the windows among ``idx`` (one-process indices) that this rank holds."""
        return [g // self.size for g in idx if g % self.size == self.rank]

    def batch_loss(self, idx, loss_of) -> torch.Tensor | None:
        """``loss_of(local positions)`` on this rank's part of the batch ``idx``, weighted by that part's share of the
        batch (so the ranks' gradients sum to the batch's); ``None`` when this rank holds none of it."""
        mine = self.mine(idx)
        if not mine:
            return None
        loss = loss_of(mine)
        return loss if len(mine) == len(idx) else loss * (len(mine) / len(idx))

    def backward(self, loss: torch.Tensor | None, opt: torch.optim.Optimizer) -> float:
        """``loss.backward()`` on this rank's part, then every gradient of ``opt``'s parameters and the loss value
        summed over the ranks (one all-reduce); returns the batch's loss (check it before ``opt.step()``: every
        rank sees the same value, so a non-finite loss stops all of them)."""
        if loss is not None:
            loss.backward()
        value = float(loss.detach()) if loss is not None else 0.0
        if self.world is None:
            return value
        params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.detach().reshape(-1).float().cpu() for g in grads] + [torch.tensor([value])])
        self.world.sum_(flat)
        off = 0
        for p, g in zip(params, grads):
            p.grad = flat[off : off + g.numel()].view_as(g).to(g.dtype).to(g.device)
            off += g.numel()
        return float(flat[-1])

    def mean(self, idx, value_of) -> float:
        """Mean of ``value_of(local position)`` over the windows ``idx`` (one-process indices), on every rank."""
        idx = list(idx)
        if not idx:
            return float("nan")
        total = sum(value_of(j) for j in self.mine(idx))
        if self.world is not None:
            total = float(self.world.sum_(torch.tensor([total], dtype=torch.float64))[0])
        return total / len(idx)
