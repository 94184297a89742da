"""Data-parallel calibration under ``torchrun`` (torch.distributed; gloo on CPU, NCCL on GPUs).

``torchrun --nproc-per-node N lowbit-compile MODEL ...``: every rank draws the same calibration windows and keeps
every N-th (``windows[rank::N]``); the block-sequential engine runs on each rank's share, and each Hessian
(and its token count) is summed over the ranks before it is normalized, so every rank holds the Hessian one
process would have computed on all windows (up to float summation order). The per-layer solves are then
deterministic functions of those Hessians and run identically on every rank; rank 0 alone writes the artifact,
whose manifest records ``world_size``. Methods that train against the float block (needs_float_stream: ApiQ,
EfficientQAT's Block-AP, ReALLM's block fine-tuning) are refused: their gradients are not all-reduced yet.

A rank that raises exits 2 and torchrun stops the others (their staging directories go with them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError


@dataclass
class World:
    rank: int = 0
    size: int = 1
    # where all-reduced tensors must be: the CPU for gloo, this rank's GPU for NCCL
    comm_device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def writer(self) -> bool:
        """Rank 0 writes the artifact and prints the progress."""
        return self.rank == 0

    def shard(self, windows: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return windows
        if windows.shape[0] < self.size:
            raise LowbitError(f"{windows.shape[0]} calibration windows for {self.size} processes: need at least one "
                              "each (raise --nsamples)")
        return windows[self.rank :: self.size]

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place (float64 on the wire for float32 tensors)."""
        if self.enabled:
            import torch.distributed as dist

            wide = t.to(self.comm_device, torch.float64 if t.dtype == torch.float32 else t.dtype)
            dist.all_reduce(wide)
            if wide is not t:
                t.copy_(wide)
        return t

    def sum_int(self, n: int) -> int:
        if not self.enabled:
            return n
        return int(self.sum_(torch.tensor([n], dtype=torch.int64))[0])

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def from_env(device: torch.device | None = None) -> World:
    """The world torchrun describes in the environment (``WORLD_SIZE``/``RANK``), else one process.

    NCCL when calibration runs on GPUs (``--device cuda``: each rank on ``cuda:LOCAL_RANK``), gloo otherwise
    (``LOWBIT_DIST_BACKEND=gloo`` forces gloo)."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return World()
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    if not dist.is_initialized():
        on_gpu = device is not None and device.type == "cuda"
        backend = "nccl" if on_gpu and os.environ.get("LOWBIT_DIST_BACKEND") != "gloo" else "gloo"
        try:
            dist.init_process_group(backend)
        except Exception as e:
            raise LowbitError(f"torch.distributed could not start ({backend}, rank {rank} of {size}): {e}") from e
    backend = dist.get_backend()
    comm = device if backend == "nccl" and device is not None else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(comm)
    return World(rank=dist.get_rank(), size=dist.get_world_size(), comm_device=comm)
