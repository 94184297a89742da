"""Artifact directory: save, validate, load, run.

Layout of ``DIR/``::

    manifest.json        format kinds/versions, method+config, model id, data hashes, versions,
                         every tensor's file/shape/dtype, every file's size and sha256
    packed.safetensors   packed tensors of every compressed linear (qweight, scales, zeros, ...)
    float.safetensors    every other parameter/buffer of the program (embeddings, norms, biases)
    program.pt2          the rewritten torch.export program (graph only: its weights are stored as
                         1-element placeholders and filled from the safetensors at load)
    tokenizer/           the tokenizer
    report.md / report.json / layer_error.png / layer_bits.png

Writing happens in a hidden ``.DIR.partial-<pid>`` directory renamed to ``DIR`` only when complete;
``manifest.json`` is written last. Loading checks every file's size and sha256, every tensor's
shape and dtype against the manifest, and rebuilds every format (which validates its own shapes);
no pickle from the artifact is unpickled except the program, which ``torch.export.load`` reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from .formats import format_from_meta

MANIFEST_VERSION = 1
PACKED_FILE = "packed.safetensors"
FLOAT_FILE = "float.safetensors"
PROGRAM_FILE = "program.pt2"

_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.int8, torch.int16,
                                torch.int32, torch.int64, torch.bool, torch.float64)}


class ArtifactError(ValueError):
    """The artifact directory is missing, incomplete, corrupt or inconsistent with its manifest."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def staging_dir(final: Path, overwrite: bool = False):
    """Yield a hidden temporary directory next to ``final``; rename it to ``final`` on success.

    On any exception (KeyboardInterrupt included) the temporary directory is removed, so an
    interrupted run never leaves a directory that looks like an artifact.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"output directory {final} already exists (use --overwrite to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def _placeholder(t: torch.Tensor) -> torch.Tensor:
    """A tensor with ``t``'s shape and dtype backed by one element: keeps the graph's metadata valid
    while the real bytes live in safetensors only."""
    ph = torch.zeros((), dtype=t.dtype).expand(t.shape)
    return torch.nn.Parameter(ph, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else ph


def _like(template: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` wrapped as a Parameter when the program holds a Parameter there."""
    return torch.nn.Parameter(t, requires_grad=False) if isinstance(template, torch.nn.Parameter) else t


def write(
    directory: Path,
    program: torch.export.ExportedProgram,
    formats: dict,
    attrs: dict,
    manifest_extra: dict,
    float_dtype: torch.dtype | None = torch.float16,
) -> dict:
    """Write tensors, program and manifest into ``directory`` (a staging dir). Returns the manifest.

    ``formats``: module name -> format; ``attrs``: module name -> {tensor name: state_dict key}.
    Float tensors other than packed ones are stored in ``float_dtype`` (None: as they are) and cast
    back to the program's dtype at load.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    state = dict(program.state_dict)
    state.update({k: v for k, v in program.constants.items() if isinstance(v, torch.Tensor)})
    packed_keys = {key for a in attrs.values() for key in a.values()}
    packed, floats, index = {}, {}, {}
    for key, t in state.items():
        t = t.detach().contiguous()
        program_dtype = t.dtype
        if key in packed_keys:
            packed[key] = t
            fname = PACKED_FILE
        else:
            if float_dtype is not None and t.is_floating_point():
                t = t.to(float_dtype)
            floats[key] = t
            fname = FLOAT_FILE
        index[key] = {"file": fname, "shape": list(t.shape), "dtype": str(t.dtype), "program_dtype": str(program_dtype)}
    save_file(packed, str(directory / PACKED_FILE))
    save_file(floats, str(directory / FLOAT_FILE))

    # Strip the bytes out of the program: placeholders with the same shape/dtype.
    real_state = program.state_dict
    saved = {k: real_state[k] for k in real_state}
    saved_consts = dict(program.constants)
    try:
        for k in saved:
            real_state[k] = _placeholder(saved[k])
        for k, v in saved_consts.items():
            if isinstance(v, torch.Tensor):
                program.constants[k] = _placeholder(v)
        with warnings.catch_warnings():
            # The 1-element placeholders trigger a harmless "no complete tensor" warning.
            warnings.simplefilter("ignore", UserWarning)
            torch.export.save(program, str(directory / PROGRAM_FILE))
    finally:
        for k, v in saved.items():
            real_state[k] = v
        program.constants.update(saved_consts)

    modules = {}
    for name, fmt in formats.items():
        modules[name] = {"format": fmt.meta(), "tensors": attrs[name], "nbytes": fmt.nbytes(),
                         "bits_per_weight": fmt.bits_per_weight()}
    manifest = {
        "lowbit_manifest": MANIFEST_VERSION,
        **manifest_extra,
        "modules": modules,
        "tensors": index,
    }
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            rel = str(p.relative_to(directory))
            files[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    manifest["files"] = files
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


class Artifact:
    """A loaded, validated artifact. Call it with ``input_ids (batch, seq)`` to get logits."""

    def __init__(self, path: Path, manifest: dict, program, formats: dict):
        self.path = path
        self.manifest = manifest
        self.program = program
        self.formats = formats
        self._module = None
        self._tokenizer = None

    def module(self) -> torch.nn.Module:
        if self._module is None:
            self._module = self.program.module()
        return self._module

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.module()(input_ids)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.path / "tokenizer"))
        return self._tokenizer

    def packed_bytes(self) -> int:
        return sum(m["nbytes"] for m in self.manifest["modules"].values())


def load(path, verify_hashes: bool = True) -> Artifact:
    """Load and validate an artifact directory; raises :class:`ArtifactError` naming the problem."""
    from safetensors import safe_open

    from . import ops  # noqa: F401  (the program refers to torch.ops.lowbit.*)

    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"artifact directory not found: {path}")
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise ArtifactError(f"{path} is not a complete lowbit artifact: manifest.json is missing")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mpath}: not valid JSON ({e})") from e
    if manifest.get("lowbit_manifest", 0) > MANIFEST_VERSION or "files" not in manifest:
        raise ArtifactError(f"{mpath}: unsupported manifest version {manifest.get('lowbit_manifest')!r}")
    for rel, meta in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            raise ArtifactError(f"{path}: file {rel} listed in the manifest is missing")
        if f.stat().st_size != meta["bytes"]:
            raise ArtifactError(f"{f}: size {f.stat().st_size} bytes, manifest says {meta['bytes']} (truncated or modified)")
        if verify_hashes and sha256_file(f) != meta["sha256"]:
            raise ArtifactError(f"{f}: sha256 does not match the manifest (corrupt or modified)")

    tensors = {}
    handles = {}
    try:
        for key, meta in manifest["tensors"].items():
            fname = meta["file"]
            if fname not in handles:
                handles[fname] = safe_open(str(path / fname), framework="pt")
            h = handles[fname]
            if key not in h.keys():
                raise ArtifactError(f"{path / fname}: tensor {key} listed in the manifest is missing")
            t = h.get_tensor(key)
            if list(t.shape) != meta["shape"] or str(t.dtype) != meta["dtype"]:
                raise ArtifactError(f"{path / fname}: tensor {key} is {t.dtype} {list(t.shape)}, "
                                    f"manifest says {meta['dtype']} {meta['shape']}")
            tensors[key] = t.to(_DTYPES[meta["program_dtype"]])
    except ArtifactError:
        raise
    except Exception as e:
        raise ArtifactError(f"{path}: cannot read tensors: {type(e).__name__}: {e}") from e

    formats = {}
    for name, m in manifest["modules"].items():
        try:
            formats[name] = format_from_meta(m["format"], {t: tensors[k] for t, k in m["tensors"].items()})
        except (KeyError, ValueError) as e:
            raise ArtifactError(f"{path}: compressed layer {name}: {e}") from e

    try:
        program = torch.export.load(str(path / PROGRAM_FILE))
    except Exception as e:
        raise ArtifactError(f"{path / PROGRAM_FILE}: cannot load the exported program: {type(e).__name__}: {e}") from e
    sd = program.state_dict
    for k in list(sd):
        if k not in tensors:
            raise ArtifactError(f"{path}: program parameter {k} has no tensor in the artifact")
        if tuple(sd[k].shape) != tuple(tensors[k].shape):
            raise ArtifactError(f"{path}: program parameter {k} expects shape {tuple(sd[k].shape)}, "
                                f"artifact has {tuple(tensors[k].shape)}")
        sd[k] = _like(sd[k], tensors[k])
    for k in list(program.constants):
        if isinstance(program.constants[k], torch.Tensor):
            if k not in tensors:
                raise ArtifactError(f"{path}: program constant {k} has no tensor in the artifact")
            program.constants[k] = tensors[k]
    return Artifact(path, manifest, program, formats)
