"""Where calibration runs: ``--device cpu|cuda|cuda:N|auto`` and ``--compute-dtype float32|bfloat16|float16``.

The model is loaded (or streamed) on the CPU as before; the engine moves one decoder block at a time to the
calibration device (:meth:`Placement.enter_block`), keeps the calibration activations there, accumulates Hessians
there in float32 or wider, and moves the block back (:meth:`Placement.exit_block`: the block's own CPU tensors are
restored, so norms and biases come back bit for bit, and the linears hold their quantized values).

The compute dtype is an autocast (:meth:`Placement.autocast`) around the block forwards, and the dtype the cached
activations are kept in: the weights stay in float32, so the quantizer sees the checkpoint's values, not their
bfloat16 rounding, and Hessians are widened from the activations whatever their dtype. Formats are always assembled
on the CPU, so the artifact's format does not depend on the device that made it; its manifest records the device
and the compute dtype.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.errors import LowbitError

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (the first GPU if torch sees one, else the CPU). Under torchrun
    ``cuda`` means this rank's GPU (``cuda:LOCAL_RANK``)."""
    spec = (spec or "cpu").strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if spec == "cuda":
            index = int(os.environ.get("LOCAL_RANK", "0") or 0)
        else:
            try:
                index = int(spec.split(":", 1)[1])
            except ValueError:
                raise LowbitError(f"--device {spec}: expected cuda:N with N an integer") from None
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise LowbitError(f"--device {spec}: {why} (torch {torch.__version__}); use --device cpu or auto")
        n = torch.cuda.device_count()
        if not 0 <= index < n:
            raise LowbitError(f"--device {spec}: GPU {index} does not exist ({n} visible)")
        return torch.device("cuda", index)
    raise LowbitError(f"--device must be cpu, cuda, cuda:N or auto, got {spec!r}")


def resolve_dtype(name: str) -> torch.dtype:
    if name not in COMPUTE_DTYPES:
        raise LowbitError(f"--compute-dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {name!r}")
    return COMPUTE_DTYPES[name]


@dataclass
class Placement:
    """The calibration device and compute dtype, and how tensors and blocks get there and back."""

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @property
    def moves(self) -> bool:
        """Whether blocks leave the CPU."""
        return self.device.type != "cpu"

    @property
    def default(self) -> bool:
        return not self.moves and self.dtype == torch.float32

    def autocast(self):
        """The context block forwards run in: an autocast to the compute dtype (none for float32)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def describe(self) -> dict:
        d = {"device": str(self.device), "compute_dtype": str(self.dtype).removeprefix("torch.")}
        if self.device.type == "cuda":
            d["device_name"] = torch.cuda.get_device_name(self.device)
        return d

    def peak_memory(self) -> dict:
        """``{"device_peak_mib": ...}``: the most the calibration device held (torch's allocator), on a GPU."""
        if self.device.type != "cuda":
            return {}
        return {"device_peak_mib": round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)}

    def to(self, obj):
        """Tensors (inside tuples, lists, dicts) to the device; floating ones to the compute dtype."""
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point():
                return obj.to(self.device, self.dtype)
            return obj.to(self.device)
        if isinstance(obj, (tuple, list)):
            return type(obj)(self.to(o) for o in obj)
        if isinstance(obj, dict):
            return {k: self.to(v) for k, v in obj.items()}
        return obj

    def enter_block(self, block: nn.Module) -> dict:
        """Move ``block`` to the device (its dtype unchanged); returns its CPU tensors for :meth:`exit_block`."""
        if not self.moves:
            return {}
        saved = {("p", n): p.data for n, p in block.named_parameters()}
        saved.update({("b", n): b for n, b in block.named_buffers()})
        block.to(device=self.device)
        return saved

    def exit_block(self, block: nn.Module, saved: dict, keep: set) -> None:
        """Put back the block's CPU tensors; parameters named in ``keep`` (the quantized linears' weights) get the
        block's current values copied into their CPU tensors first (cast to the model's dtype)."""
        if not saved:
            return
        for n, p in block.named_parameters():
            cpu = saved[("p", n)]
            if n in keep:
                cpu.copy_(p.data)  # the quantized values, for the chain and the head's calibration
            p.data = cpu
        for n, b in list(block.named_buffers()):
            mod_name, _, attr = n.rpartition(".")
            mod = block.get_submodule(mod_name) if mod_name else block
            mod._buffers[attr] = saved[("b", n)]
