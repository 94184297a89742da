"""Where the calibration activations live between blocks: on the calibration device, in CPU memory, or on disk.

The engine keeps one tensor per calibration window (the inputs of the current block, and for training methods
the float chain's too) and builds the next block's inputs while it reads the current ones, so two generations
are alive at once. At 7B with 128 windows of 2048 tokens one generation is 4 GiB in float32: more than a GPU
beside the block or a small machine may hold. :class:`ActivationStore` decides (``--activations auto``: the
calibration device if twice the activations fit in half its free memory, else CPU memory on the same rule, else
disk) or follows ``--activations device|cpu|disk``; ``--offload-dir DIR`` says where disk goes (default: beside
the output).

On disk every list is one anonymous file (``O_TMPFILE``-style: unlinked as soon as it is created), written as the
windows are produced and read back a window at a time with plain reads, so nothing is resident but the window in
use, the file's space is returned when the list is dropped, and a killed run leaves no file behind. The directory
is checked before calibration starts: unwritable, or too little free space for two generations, is refused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.runtime.resources import available_bytes

WHERE = ("auto", "device", "cpu", "disk")


class DiskList(Sequence):
    """Activation tensors in one unlinked temporary file, read back a window at a time onto ``placement``'s
    device. ``append`` writes; indexing and slicing read."""

    def __init__(self, directory: Path, placement):
        self.directory = directory
        self.file = tempfile.TemporaryFile(dir=str(directory))  # no name on disk: nothing to leave behind
        self.placement = placement
        self.entries: list[tuple[int, int, tuple, torch.dtype]] = []
        self.end = 0
        self.all_finite = True

    def append(self, t: torch.Tensor) -> None:
        t = t.detach()
        self.all_finite = self.all_finite and bool(torch.isfinite(t).all())
        raw = t.contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes()
        try:
            os.pwrite(self.file.fileno(), raw, self.end)
        except OSError as e:
            raise LowbitError(f"--offload-dir {self.directory}: cannot write calibration activations "
                              f"({e.strerror or e})") from e
        self.entries.append((self.end, len(raw), tuple(t.shape), t.dtype))
        self.end += len(raw)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        off, n, shape, dtype = self.entries[i]
        raw = os.pread(self.file.fileno(), n, off)
        t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
        return t.to(self.placement.device)

    def close(self) -> None:
        self.file.close()


class ActivationStore:
    """Makes the engine's activation lists: plain lists on the device or the CPU, or :class:`DiskList`."""

    def __init__(self, where: str, placement, directory: Path | None = None, created: bool = False):
        if where not in ("device", "cpu", "disk"):
            raise ValueError(f"activation store {where!r}: resolve 'auto' with choose() first")
        self.where = where
        self.placement = placement
        self.directory = directory
        self.created = created  # the offload directory was made by this run: removed at close if empty

    @staticmethod
    def choose(where: str, placement, need_bytes: int, offload_dir: str | None, default_dir: Path,
               log=None) -> "ActivationStore":
        """Resolve ``auto`` from free memory (``need_bytes``: one generation), check the disk directory, and say
        what was chosen."""
        if where not in WHERE:
            raise LowbitError(f"--activations must be one of {', '.join(WHERE)}, got {where!r}")
        on_gpu = placement.device.type == "cuda"
        if where == "auto":
            if offload_dir is not None:
                where = "disk"
            elif on_gpu and 4 * need_bytes <= torch.cuda.mem_get_info(placement.device)[0]:
                where = "device"
            elif 4 * need_bytes <= available_bytes():  # two generations in half the free memory
                where = "cpu"
            else:
                where = "disk"
        if where == "device" and not on_gpu:
            where = "cpu"
        directory, created = None, False
        if where == "disk":
            directory = Path(offload_dir) if offload_dir is not None else Path(default_dir)
            created = check_offload_dir(directory, 2 * need_bytes)
        if log is not None:
            size = f"{need_bytes / 2**30:.2f} GiB" if need_bytes >= 2**30 else f"{need_bytes / 2**20:.1f} MiB"
            log(f"[calibrate] activations: {size} per generation, kept "
                + {"device": f"on {placement.device}", "cpu": "in CPU memory",
                   "disk": f"on disk in {directory}"}[where])
        return ActivationStore(where, placement, directory, created)

    def new_list(self):
        return DiskList(self.directory, self.placement) if self.where == "disk" else []

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        """The form a produced tensor is kept in by a plain list (``device``: as is, ``cpu``: moved there)."""
        return t.cpu() if self.where == "cpu" and t.device.type != "cpu" else t

    def fetch(self, t: torch.Tensor) -> torch.Tensor:
        """A kept tensor, where the block runs."""
        return t if t.device == self.placement.device else t.to(self.placement.device)

    def close(self) -> None:
        if self.created and self.directory is not None:
            try:
                self.directory.rmdir()  # only if empty: the lists' files have no names
            except OSError:
                pass

    def collect(self, tensors) -> list:
        """A stored list of ``tensors`` (e.g. the float chain's copy of the captured inputs)."""
        out = self.new_list()
        for t in tensors:
            out.append(self.keep(t.clone()) if self.where != "disk" else t)
        return out


def _free_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def check_offload_dir(directory: Path, need_bytes: int) -> bool:
    """Refuse, before calibration, a directory that cannot take ``need_bytes`` of activations. Returns whether this
    call created it (a refused directory it created is removed again)."""
    made = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=str(directory)) as f:
            f.write(b"\0")
    except OSError as e:
        if made:
            shutil.rmtree(directory, ignore_errors=True)
        raise LowbitError(f"--offload-dir {directory}: not writable ({e.strerror or e})") from None
    free = _free_bytes(directory)
    if free < need_bytes:
        if made:
            directory.rmdir()
        raise LowbitError(f"--offload-dir {directory}: {free / 2**30:.2f} GiB free, the calibration activations need "
                          f"{need_bytes / 2**30:.2f} GiB (two generations of windows)")
    return made
