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
shape and dtype against the manifest, and rebuilds every format (which validates its own shapes).
Nothing from the artifact is unpickled or executed: the program is rebuilt from the JSON graph inside
``program.pt2`` after checking it (:mod:`lowbit.runtime.program_io`), with the tensors of the safetensors files.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import torch

from .formats import format_from_meta
from .output_dir import sha256_file, staging_dir  # noqa: F401  (writers stage through the artifact module)
from .program_io import ProgramError, read_program

MANIFEST_VERSION = 1
PACKED_FILE = "packed.safetensors"
FLOAT_FILE = "float.safetensors"
PROGRAM_FILE = "program.pt2"

_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.int8, torch.int16,
                                torch.int32, torch.int64, torch.bool, torch.float64)}


class ArtifactError(ValueError):
    """The artifact directory is missing, incomplete, corrupt or inconsistent with its manifest."""


def placeholder(shape, dtype: torch.dtype, parameter: bool = False, requires_grad: bool = False) -> torch.Tensor:
    """A tensor of ``shape`` and ``dtype`` backed by one element: keeps a graph's metadata valid while the real
    bytes live elsewhere (safetensors here; the checkpoint for a streamed model, compiler/engine/stream.py)."""
    ph = torch.zeros((), dtype=dtype).expand(*shape)
    return torch.nn.Parameter(ph, requires_grad=requires_grad) if parameter else ph


def is_placeholder(t: torch.Tensor) -> bool:
    return t.numel() > 1 and all(s == 0 for s in t.stride())


def _placeholder(t: torch.Tensor) -> torch.Tensor:
    return placeholder(t.shape, t.dtype, isinstance(t, torch.nn.Parameter), t.requires_grad)



def write(
    directory: Path,
    program: torch.export.ExportedProgram,
    formats: dict,
    attrs: dict,
    manifest_extra: dict,
    float_dtype: torch.dtype | None = torch.float16,
    sources: dict | None = None,
    byte_source=None,
) -> dict:
    """Write tensors, program and manifest into ``directory`` (a staging dir). Returns the manifest.

    ``formats``: module name -> format; ``attrs``: module name -> {tensor name: state_dict key}.
    Float tensors other than packed ones are stored in ``float_dtype`` (None: as they are) and cast
    back to the program's dtype at load.

    Block streaming (:mod:`lowbit.compiler.engine.stream`) never holds the whole model: ``sources`` maps a
    state-dict key whose program tensor is a placeholder to a function returning the real tensor (read from the
    checkpoint when the file gets to it), and ``byte_source(t)`` names the spill file region holding a packed
    tensor's bytes (copied file to file). The files are written one tensor at a time either way.
    """
    from . import safetensors_stream

    directory = Path(directory)
    sources = sources or {}
    state = dict(program.state_dict)
    state.update({k: v for k, v in program.constants.items() if isinstance(v, torch.Tensor)})
    packed_keys = {key for a in attrs.values() for key in a.values()}
    packed, floats, index = {}, {}, {}
    for key, t in state.items():
        program_dtype = dtype = t.dtype
        if key in packed_keys:
            packed[key] = t.detach()
            fname = PACKED_FILE
        else:
            dtype = float_dtype if float_dtype is not None and t.is_floating_point() else t.dtype
            # cast (or read, for a streamed model's placeholders) when written: one float tensor resident at a time
            get = sources.get(key, lambda t=t: t.detach())
            floats[key] = safetensors_stream.Lazy(tuple(t.shape), dtype, lambda f=get, d=dtype: f().to(d))
            fname = FLOAT_FILE
        index[key] = {"file": fname, "shape": list(t.shape), "dtype": str(dtype), "program_dtype": str(program_dtype)}
    safetensors_stream.write(directory / PACKED_FILE, packed, byte_source)
    safetensors_stream.write(directory / FLOAT_FILE, floats)
    del packed, floats

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
            # into memory first (the graph alone: a few MB): torch's zip writer aborts the process on a failed
            # write (full disk, file-size limit), Python's file write raises an error that can be handled
            buf = io.BytesIO()
            torch.export.save(program, buf)
        (directory / PROGRAM_FILE).write_bytes(buf.getvalue())
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


def _check_manifest(m, mpath: Path) -> None:
    """The manifest's structure (types of every field load uses), so that a hand-edited or damaged manifest is an
    :class:`ArtifactError` naming the field, not a ``TypeError`` or ``KeyError``."""
    def bad(field: str, expected: str):
        raise ArtifactError(f"{mpath}: field {field}: expected {expected}")

    if not isinstance(m, dict):
        bad("(top level)", "a JSON object")
    v = m.get("lowbit_manifest")
    if not isinstance(v, int) or isinstance(v, bool):
        bad("lowbit_manifest", "an integer manifest version (is this a lowbit artifact?)")
    if v > MANIFEST_VERSION:
        raise ArtifactError(f"{mpath}: manifest version {v} is newer than this lowbit reads ({MANIFEST_VERSION})")
    for key in ("files", "tensors", "modules"):
        if not isinstance(m.get(key), dict):
            bad(key, "an object")
    for rel, meta in m["files"].items():
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or not parts:
            bad(f"files[{rel!r}]", "a path inside the artifact directory")
        if not (isinstance(meta, dict) and isinstance(meta.get("bytes"), int) and isinstance(meta.get("sha256"), str)):
            bad(f"files[{rel!r}]", '{"bytes": int, "sha256": str}')
    for key, meta in m["tensors"].items():
        if not (isinstance(meta, dict) and meta.get("file") in (PACKED_FILE, FLOAT_FILE)
                and isinstance(meta.get("shape"), list) and all(type(s) is int and s >= 0 for s in meta["shape"])
                and all(isinstance(meta.get(k), str) and meta[k] in _DTYPES for k in ("dtype", "program_dtype"))):
            bad(f"tensors[{key!r}]", f'{{"file": {PACKED_FILE} or {FLOAT_FILE}, "shape": [int], "dtype", '
                                     '"program_dtype": torch dtype names}')
    for name, mod in m["modules"].items():
        if not (isinstance(mod, dict) and isinstance(mod.get("format"), dict) and isinstance(mod.get("tensors"), dict)
                and all(isinstance(k, str) and k in m["tensors"] for k in mod["tensors"].values())):
            bad(f"modules[{name!r}]", '{"format": {...}, "tensors": {name: a key of "tensors"}}')


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
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath}: not valid JSON ({e})") from e
    _check_manifest(manifest, mpath)
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
        except KeyError as e:
            raise ArtifactError(f"{mpath}: compressed layer {name}: no {e} (format field or tensor)") from None
        except Exception as e:  # a format that does not validate: its own message names the field
            raise ArtifactError(f"{mpath}: compressed layer {name}: {type(e).__name__}: {e}") from None

    try:  # the graph from the archive's JSON, the tensors from safetensors: nothing is unpickled or run
        program = read_program(path / PROGRAM_FILE, tensors)
    except ProgramError as e:
        raise ArtifactError(str(e)) from e
    return Artifact(path, manifest, program, formats)
