"""Method protocol and registry.

A method decides the values of every compressed linear; a format stores them. Methods run inside
the block-sequential calibration engine (:mod:`lowbit.compiler.engine.calibrate`), which calls
``calibrate_block`` once per decoder block with a :class:`BlockContext`-like object offering:

* ``linears``: ``{qualified name: module}`` of the block's linear-like modules (``nn.Linear`` or
  GPT-2's ``Conv1D``), with ``weight_of(module)`` / ``set_weight(module, w)`` in ``(out, in)`` layout;
* ``hessians(names)``: ``{name: X^T X / n}`` over the block's quantized-chain inputs;
* ``float_inputs`` / ``float_targets`` / ``quant_inputs``: cached activations for training methods.

``calibrate_block`` returns ``{name: format}`` and must leave each linear's weight set to the
dequantized value, so that the next block is calibrated on the quantized chain.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, fields
from typing import ClassVar

from .data_parallel import active_world

REGISTRY: dict[str, type["Method"]] = {}


def progress(msg: str) -> None:
    """A method's progress line on stderr; under torchrun only rank 0 prints (every rank takes the same steps, so
    the others' lines would repeat it; failures still surface as each rank's exception)."""
    if os.environ.get("RANK", "0") == "0":
        print(msg, file=sys.stderr, flush=True)


def register(cls):
    REGISTRY[cls.name] = cls
    return cls


@dataclass
class UniformConfig:
    """Shared options of the uniform (AffineIntK) methods."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False

    def validate(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"--bits must be an integer in 1..8, got {self.bits}")
        if not isinstance(self.group_size, int) or not 1 <= self.group_size <= 65536:
            raise ValueError(f"--group-size must be an integer in 1..65536, got {self.group_size}")

    def tag(self) -> str:
        return f"w{self.bits}g{self.group_size}" + ("sym" if self.symmetric else "")


class Method:
    """Base class: subclasses set ``name``, ``Config`` and implement :meth:`calibrate_block`."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = UniformConfig
    needs_data: ClassVar[bool] = True  # False: data-free (calibration data only used for verification)
    # True: calibrate_block works on whatever device the block is on (--device cuda; tensors it creates follow
    # the weights' device). A HessianMethod that is not gets its weight and Hessian on the CPU in float32 (the
    # block forward and the Hessians still run on the device); a training method that is not is refused there.
    device_ready: ClassVar[bool] = False

    def __init__(self, config):
        config.validate()
        self.config = config

    def calibrate_block(self, ctx) -> dict:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"method": self.name, **{f.name: getattr(self.config, f.name) for f in fields(self.config)}}


def take_hessian(hs: dict, name: str):
    """Pop ``name``'s Hessian from ``ctx.hessians``' dict as the caller's own: linears reading the same input
    share one tensor there, so a copy is made while another name still holds it. The caller may then modify
    or free it (GPTQ's large-input path works on it in place)."""
    h = hs.pop(name)
    return h.clone() if any(v is h for v in hs.values()) else h


class HessianMethod(Method):
    """A method that quantizes each linear of a block from its weight and Hessian alone.

    Subclasses implement ``quantize_linear(w, h) -> (format, info)``; this class collects the block's
    Hessians, writes the dequantized weights back (the quantized chain) and records diagnostics.
    """

    def quantize_linear(self, w, h):
        raise NotImplementedError

    def calibrate_block(self, ctx) -> dict:
        """Under torchrun the block's linears are shared out by cost (``out * in^2 + in^3``: the column loop and the
        Hessian's factorizations): each rank solves its own (every rank holds every summed Hessian), then each
        result is broadcast from its owner, so every rank ends the block with the weights and formats one process
        would have."""
        hs = ctx.hessians(list(ctx.linears))
        world = active_world(ctx)
        split = world is not None
        if split:
            shapes = [ctx.weight_of(m).shape for m in ctx.linears.values()]
            owner = world.owners([float(n) * k * k + float(k) ** 3 for n, k in shapes])
        solved = {}
        for i, (name, mod) in enumerate(ctx.linears.items()):
            h = take_hessian(hs, name)
            if split and owner[i] != world.rank:
                continue  # another rank's; its Hessian goes now
            w = ctx.weight_of(mod)
            if not self.device_ready:  # solved on the CPU (see Method.device_ready)
                w, h = w.float().cpu(), h.cpu()
            try:
                solved[name] = self.quantize_linear(w, h)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from e
            del h
        out = {}
        for i, (name, mod) in enumerate(ctx.linears.items()):
            fmt, info = solved.pop(name, (None, None))
            if split:
                fmt, info = world.broadcast_result(fmt, info, owner[i])
                info = {**info, "solved_by_rank": owner[i]}
            ctx.set_weight(mod, fmt.dequantize())
            ctx.record(name, info)
            out[name] = fmt
        return out
