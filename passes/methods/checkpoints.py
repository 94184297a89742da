"""Per-block checkpoints for long calibrations (EfficientQAT's Block-AP, ReALLM).

The pipeline sets ``checkpoint_dir`` (``OUTPUT.ckpt/``) and ``resume`` on a method that has them. A finished
block is saved as ``block-<i>.pt``: the formats it produced (meta + tensors) and what it recorded in the
report. ``key.json`` ties the directory to the method's options and the calibration inputs of block 0, so a
resumed run refuses a checkpoint written for anything else. Every file is written atomically (temporary
file + rename): an interruption leaves the previous checkpoint intact, never a truncated one.

Replaying a finished block sets its dequantized weights, so the blocks after it are calibrated on the
same quantized chain as in an uninterrupted run and give the same artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from lowbit.runtime.checkpoint_io import load_checkpoint


def save_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic: an interruption leaves the previous file intact


def format_state(fmt) -> dict:
    return {"meta": json.dumps(fmt.meta()), "tensors": {k: v for k, v in fmt.tensors().items() if v is not None}}


def format_load(state):
    from lowbit.runtime.formats import format_from_meta

    return format_from_meta(json.loads(state["meta"]), state["tensors"])


class BlockCheckpoints:
    """Mixin for a :class:`~lowbit.passes.methods.base.Method`: atomic per-block checkpoints and replay."""

    checkpoint_dir: Path | None = None  # set by the pipeline (OUTPUT.ckpt); None: no checkpoints
    resume: bool = False
    _ckpt_key: str | None = None

    def ckpt_path(self, name: str) -> Path | None:
        return None if self.checkpoint_dir is None else Path(self.checkpoint_dir) / name

    def check_key(self, ctx) -> None:
        """At the first block: tie the checkpoint directory to these options and these calibration inputs
        (a fresh run empties it; a resumed run with other options or data is refused)."""
        if self.checkpoint_dir is None or self._ckpt_key is not None:
            return
        h = hashlib.sha256()
        for x in ctx.quant_inputs or []:
            h.update(x.detach().float().cpu().numpy().tobytes())
        self._ckpt_key = json.dumps({"config": asdict(self.config), "inputs": h.hexdigest()}, sort_keys=True)
        d = Path(self.checkpoint_dir)
        key_file = d / "key.json"
        if key_file.exists() and self.resume:
            if key_file.read_text() != self._ckpt_key:
                raise ValueError(f"{d} was written for other options or other calibration data; "
                                 "use the same options, or --overwrite to restart")
        else:
            d.mkdir(parents=True, exist_ok=True)
            for old in d.glob("*.pt"):
                old.unlink()
            key_file.write_text(self._ckpt_key)

    def restore_block(self, ctx) -> dict | None:
        """With ``resume`` and a saved ``block-<i>.pt``: set the block's weights and report entries from it
        and return its formats; otherwise None (the block must be calibrated)."""
        done = self.ckpt_path(f"block-{ctx.index}.pt")
        if not (self.resume and done is not None and done.exists()):
            return None
        state = load_checkpoint(done)
        out = {}
        for name, mod in ctx.linears.items():
            if name not in state["formats"]:
                raise ValueError(f"{done} has no entry for {name}; restart with --overwrite")
            out[name] = format_load(state["formats"][name])
            ctx.set_weight(mod, out[name].dequantize())
            ctx.record(name, json.loads(state["info"][name]))
        print(f"[{self.name}] {ctx.prefix}: restored from {done}", file=sys.stderr, flush=True)
        return out

    def save_block(self, ctx, out: dict, infos: dict) -> None:
        """Save a finished block (its formats and each linear's report entries)."""
        done = self.ckpt_path(f"block-{ctx.index}.pt")
        if done is None:
            return
        save_atomic(done, {"formats": {n: format_state(f) for n, f in out.items()},
                           "info": {n: json.dumps(infos.get(n, {})) for n in out}})
