"""Data-parallel calibration under ``torchrun`` (torch.distributed; gloo on CPU, NCCL on GPUs).

``torchrun --nproc-per-node N lowbit-compile MODEL ...``: every rank draws the same calibration windows and keeps
every N-th (``windows[rank::N]``); the block-sequential engine runs on each rank's share, and each Hessian
(and its token count) is summed over the ranks before it is normalized, so every rank holds the Hessian one
process would have computed on all windows (up to float summation order). The per-layer solves are then
deterministic functions of those Hessians and run identically on every rank; rank 0 alone writes the artifact,
whose manifest records ``world_size``. Methods that train each block against the float block (ApiQ, EfficientQAT's
Block-AP, ReALLM's block fine-tuning) take the one-process batches in the same order on every rank, each rank
computing the part of a batch it holds, and sum their gradients before every step
(``lowbit.passes.methods.data_parallel``); end-to-end phases (EfficientQAT's E2E-QP) run on rank 0 over all windows.
ReALLM shares its candidate search out by linear the same way. Tensors travel as raw bytes (gloo lacks int16).

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

    def owners(self, costs: list) -> list[int]:
        """The rank that does each item's work: the largest first, each to the least loaded rank so far (ties to
        the lowest rank), the same answer on every rank."""
        load = [0.0] * self.size
        out = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            r = min(range(self.size), key=lambda r: (load[r], r))
            out[i] = r
            load[r] += costs[i]
        return out

    def broadcast_result(self, fmt, info: dict | None, src: int):
        """``(fmt, info)`` as rank ``src`` computed them, on every rank: the format's tensors and a JSON header
        describing its dataclass fields (no pickling: every rank rebuilds it from
        :data:`lowbit.runtime.formats.FORMATS`' classes)."""
        if not self.enabled:
            return fmt, info
        import json

        import torch.distributed as dist

        if self.rank == src:
            tensors: list = []
            header = json.dumps({"fmt": _describe(fmt, tensors), "info": info}).encode()
            n = torch.tensor([len(header)], dtype=torch.int64, device=self.comm_device)
            dist.broadcast(n, src)
            dist.broadcast(torch.frombuffer(bytearray(header), dtype=torch.uint8).to(self.comm_device), src)
            for t in tensors:  # as raw bytes: gloo has no int16 (a VQ permutation) and other small types
                dist.broadcast(t.detach().contiguous().reshape(-1).view(torch.uint8).to(self.comm_device), src)
            return fmt, info
        n = torch.empty(1, dtype=torch.int64, device=self.comm_device)
        dist.broadcast(n, src)
        raw = torch.empty(int(n[0]), dtype=torch.uint8, device=self.comm_device)
        dist.broadcast(raw, src)
        head = json.loads(raw.cpu().numpy().tobytes())
        return _rebuild(head["fmt"], self, src), head["info"]

    def sum_int(self, n: int) -> int:
        if not self.enabled:
            return n
        return int(self.sum_(torch.tensor([n], dtype=torch.int64))[0])

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _describe(obj, tensors: list) -> dict:
    """A format dataclass as JSON: scalars inline, tensors by position in ``tensors`` (with shape and dtype)."""
    import dataclasses

    fields = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, torch.Tensor):
            tensors.append(v)
            fields[f.name] = {"tensor": len(tensors) - 1, "shape": list(v.shape), "dtype": str(v.dtype)[6:]}
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            fields[f.name] = {"nested": _describe(v, tensors)}
        else:
            fields[f.name] = {"value": v}
    return {"class": type(obj).__name__, "fields": fields}


def _rebuild(desc: dict, world: "World", src: int):
    """The receiving side of :func:`_describe`: tensors received in order, the dataclass rebuilt."""
    import torch.distributed as dist

    from lowbit.runtime import formats

    classes = {c.__name__: c for c in (*formats.FORMATS.values(), formats.LowRank)}
    if desc["class"] not in classes:
        raise LowbitError(f"torchrun: rank {world.rank} received an unknown format {desc['class']!r}")
    kwargs = {}
    for name, f in desc["fields"].items():  # the sender's order (depth first), so tensors arrive in turn
        if "tensor" in f:
            dtype = getattr(torch, f["dtype"])
            n = torch.Size(f["shape"]).numel() * torch.empty(0, dtype=dtype).element_size()
            raw = torch.empty(n, dtype=torch.uint8, device=world.comm_device)
            dist.broadcast(raw, src)
            kwargs[name] = raw.cpu().view(dtype).reshape(f["shape"])
        elif "nested" in f:
            kwargs[name] = _rebuild(f["nested"], world, src)
        else:
            kwargs[name] = f["value"]
    return classes[desc["class"]](**kwargs)


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
