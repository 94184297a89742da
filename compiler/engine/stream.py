"""Block streaming: calibrate a model whose float weights are never all resident (``lowbit-compile --stream``).

The model is built on the meta device from its ``config.json``. Then:

* every linear inside the decoder blocks, the embedding and the output head get a *placeholder* (one element
  broadcast to the full shape: shape and dtype right, no memory), so the model can be captured with
  ``torch.export`` and its graph rewritten as usual; the other tensors (norms, biases, rotary tables) are small
  and loaded at once;
* the embedding is read from the checkpoint only while the calibration inputs of block 0 are captured;
* each block's linears are read from the checkpoint (one safetensors tensor at a time) when the block's turn
  comes, calibrated, and replaced by placeholders again; the block's packed formats go to a spill file next to
  the output (``.OUT.spill-PID/``) and are memory-mapped back, so they do not stay resident either;
* the artifact's files are written one tensor at a time: float tensors still held by placeholders (embedding,
  head, linears an override keeps float) are read from the checkpoint when the file gets to them, packed tensors
  are copied from the spill file (:func:`lowbit.runtime.artifact.write`).

What stays resident: one block's float weights and its calibration work, the activation cache, the embedding
while block 0's inputs are captured. The artifact is the same as without streaming (byte for byte for RTN).
Reads safetensors checkpoints (sharded or not) and GGUF files of the Llama architecture (dequantized a tensor at a
time, exactly as transformers' GGUF loader gives them: :mod:`lowbit.compiler.engine.gguf_reader`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.compiler.engine.models import (_check_safetensors, find_blocks, is_linear_like, release_gguf_readers,
                                           resolve, shared_gguf_readers)
from lowbit.errors import LowbitError
from lowbit.runtime import artifact
from lowbit.runtime.artifact import is_placeholder


def placeholder(shape, dtype=torch.float32) -> nn.Parameter:
    """A parameter of ``shape`` backed by one element (trainable, as ``from_pretrained`` makes parameters)."""
    return artifact.placeholder(shape, dtype, parameter=True, requires_grad=True)


class Checkpoint:
    """The tensors of a safetensors checkpoint directory, read one at a time (``get``)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        headers = _check_safetensors(self.directory)  # every shard's header and length, before calibration
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise LowbitError(f"{index}: not a safetensors index ({e})") from e
            for f in sorted(set(wm.values())):
                if not (self.directory / f).is_file():
                    raise LowbitError(f"{index}: shard {f} is missing")
        self.where = {k: f for f, header in headers.items() for k in header if k != "__metadata__"}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.where:
            raise LowbitError(f"{self.directory}: no tensor {name!r} in the checkpoint")
        try:
            with safe_open(str(self.where[name]), framework="pt") as f:  # unmapped again when closed
                t = f.get_tensor(name)
        except Exception as e:
            raise LowbitError(f"{self.where[name]}: cannot read {name}: {type(e).__name__}: {e}") from e
        return t.to(dtype)


class Spill:
    """Packed tensors moved out of memory: appended to one file, memory-mapped back (pages not resident until
    read), and copied file to file into the artifact (:meth:`origin` tells the writer where their bytes are)."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / "packed.spill"
        self.file = open(self.path, "wb")
        self.origins: dict = {}

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        from lowbit.runtime.safetensors_stream import tensor_bytes

        raw = tensor_bytes(t)
        pos = self.file.tell()
        pad = -pos % 64
        self.file.write(b"\0" * pad)
        off = pos + pad
        self.file.write(raw)
        self.file.flush()
        n = len(raw)
        if n == 0:
            return t.detach().clone()
        mm = np.memmap(self.path, dtype=np.uint8, mode="c", offset=off, shape=(n,))
        out = torch.from_numpy(mm).view(t.dtype).reshape(t.shape)
        self.origins[(out.data_ptr(), n)] = (str(self.path), off, n)
        return out

    def format(self, fmt):
        """``fmt`` with every tensor (low-rank factors included) replaced by its spilled copy."""
        changes = {}
        for f in dataclasses.fields(fmt):
            v = getattr(fmt, f.name)
            if isinstance(v, torch.Tensor):
                changes[f.name] = self.tensor(v)
            elif dataclasses.is_dataclass(v) and not isinstance(v, type):
                changes[f.name] = self.format(v)
        return dataclasses.replace(fmt, **changes)

    def origin(self, t: torch.Tensor):
        return self.origins.get((t.data_ptr(), t.numel() * t.element_size()))

    def close(self) -> None:
        self.file.close()


class Streamer:
    """Loads and releases block weights for :class:`lowbit.compiler.engine.calibrate.Engine`."""

    def __init__(self, model: nn.Module, checkpoint: Checkpoint, spill_parent: Path, output_name: str):
        self.model = model
        self.ckpt = checkpoint
        self.prefix, self.blocks = find_blocks(model)
        # named like the staging folders, so a run killed outright has its spill removed by the next run
        self.spill_dir = Path(spill_parent) / f".{output_name}.spill-{os.getpid()}"
        shutil.rmtree(self.spill_dir, ignore_errors=True)
        self.spill_dir.mkdir()
        self.spill = Spill(self.spill_dir)

    # -- Engine hooks ---------------------------------------------------------------------------
    def load_block(self, index: int, block: nn.Module) -> None:
        for name, mod in block.named_modules():
            if is_linear_like(mod) and is_placeholder(mod.weight):
                full = f"{self.prefix}.{index}.{name}.weight"
                mod.weight = nn.Parameter(self.ckpt.get(full))

    def release_block(self, index: int, block: nn.Module, results: dict) -> dict:
        """Placeholders back in the block; the block's formats spilled. Returns the spilled formats."""
        for mod in block.modules():
            if is_linear_like(mod):
                mod.weight = placeholder(mod.weight.shape, mod.weight.dtype)
        return {name: self.spill.format(fmt) for name, fmt in results.items()}

    def embedding(self):
        """A context: the input embedding holds its real weights inside it (block 0's inputs are captured)."""
        streamer = self

        class _Ctx:
            def __enter__(self):
                emb = streamer.model.get_input_embeddings()
                self.saved = emb.weight
                name = streamer.param_name(emb.weight)
                emb.weight = nn.Parameter(streamer.ckpt.get(name))

            def __exit__(self, *exc):
                streamer.model.get_input_embeddings().weight = self.saved

        return _Ctx()

    # -- artifact -------------------------------------------------------------------------------
    def param_name(self, p: torch.Tensor) -> str:
        for n, q in self.model.named_parameters(remove_duplicate=False):
            if q is p and n in self.ckpt:
                return n
        raise LowbitError(f"{self.ckpt.directory}: a streamed parameter has no tensor in the checkpoint")

    def _stored_name(self, name: str) -> str:
        """The checkpoint's name for parameter ``name`` (a tied head is stored under the embedding's name)."""
        if name in self.ckpt:
            return name
        return self.param_name(dict(self.model.named_parameters(remove_duplicate=False)).get(name))

    def sources(self, program) -> dict:
        """``{state-dict key: reader}`` for the program's placeholders (read from the checkpoint at write time)."""
        out = {}
        for key, t in program.state_dict.items():
            if isinstance(t, torch.Tensor) and is_placeholder(t):
                name = key[len("model."):] if key.startswith("model.") else key  # the capture wrapper's prefix
                out[key] = lambda n=self._stored_name(name), d=t.dtype: self.ckpt.get(n, d)
        return out

    def contiguous_metadata(self, program) -> None:
        """Record the program's placeholder tensors with contiguous strides, as the in-memory path records them
        (the artifact loads them contiguous)."""
        sig = program.graph_signature
        names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
        for node in program.graph.nodes:
            t = program.state_dict.get(names.get(node.name, ""))
            val = node.meta.get("val")
            if t is not None and is_placeholder(t) and val is not None:
                with val.fake_mode:
                    node.meta["val"] = torch.empty(tuple(val.shape), dtype=val.dtype).requires_grad_(val.requires_grad)

    def close(self) -> None:
        self.spill.close()
        shutil.rmtree(self.spill_dir, ignore_errors=True)


def _return_freed_memory() -> None:
    """glibc only: allocations of 128 KiB or more get their own mapping, given back to the system when freed.
    By default its threshold rises to 32 MiB after the first large free, and block-sized temporaries then stay
    in the heap: measured +300 MB resident after one 7B block's Hessians. Elsewhere (musl, macOS) nothing."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def load(spec: str, spill_parent: Path, output_name: str = "lowbit"):
    """``(model, tokenizer, source, streamer)`` for a safetensors checkpoint or a GGUF file
    (:mod:`lowbit.compiler.engine.gguf_reader`), with placeholders for its big tensors (see the module docstring)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    src = resolve(spec)
    hf_logging.set_verbosity_error()
    _return_freed_memory()
    gguf = {"gguf_file": src.path.name} if src.kind == "gguf" else {}
    where = str(src.path.parent if gguf else src.path)
    ckpt = None if gguf else Checkpoint(src.path)  # safetensors headers checked before anything else
    try:
        with shared_gguf_readers():  # one header parse for the check, the config, the tokenizer and the reader
            config = AutoConfig.from_pretrained(where, **gguf)
            tokenizer = AutoTokenizer.from_pretrained(where, **gguf)
    except Exception as e:
        raise LowbitError(f"could not read the config/tokenizer of {src.path}: {type(e).__name__}: {e}") from e
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if gguf:  # names mapped on the meta model, tensors dequantized one at a time
        from lowbit.compiler.engine.gguf_reader import GGUFCheckpoint

        try:
            ckpt = GGUFCheckpoint(src.path, config, model)
        finally:
            release_gguf_readers()  # the checkpoint holds its reader; nothing else needs one
    model.eval()
    prefix, blocks = find_blocks(model)
    big = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        big.add(id(head.weight))
    for block in blocks:
        for mod in block.modules():
            if is_linear_like(mod):
                big.add(id(mod.weight))
    done: dict[int, nn.Parameter] = {}
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        if id(p) in done:  # tied: the same parameter object again
            setattr(mod, attr, done[id(p)])
            continue
        if id(p) in big:
            new = placeholder(p.shape)
        else:
            if name not in ckpt:
                raise LowbitError(f"{src.path}: no tensor {name!r} in the checkpoint")
            new = nn.Parameter(ckpt.get(name))  # as from_pretrained makes them
        done[id(p)] = new
        setattr(mod, attr, new)
    _rebuild_buffers(model, config, ckpt)
    tokenizer.model_max_length = 1 << 30
    spill_parent = Path(spill_parent)
    spill_parent.mkdir(parents=True, exist_ok=True)
    return model, tokenizer, src, Streamer(model, ckpt, spill_parent, output_name)


def _rebuild_buffers(model: nn.Module, config, ckpt) -> None:
    """Buffers left on the meta device: persistent ones from the checkpoint, computed ones (rotary ``inv_freq``)
    by building their module again on the CPU from the config."""
    for mod_name, mod in list(model.named_modules()):
        meta = [n for n, b in mod.named_buffers(recurse=False) if b.is_meta]
        if not meta:
            continue
        if all(f"{mod_name}.{n}" in ckpt for n in meta):
            for n in meta:
                mod._buffers[n] = ckpt.get(f"{mod_name}.{n}")
            continue
        try:
            fresh = type(mod)(config=config)
        except Exception as e:
            raise LowbitError(f"--stream: cannot rebuild buffers {meta} of {mod_name} ({type(mod).__name__}): "
                              f"{type(e).__name__}: {e}") from e
        parent_name, _, attr = mod_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, fresh.eval())
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise LowbitError(f"--stream: buffers {left[:3]} have no value")

