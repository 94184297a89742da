"""Reading an artifact's ``program.pt2`` without running anything it holds.

An artifact is untrusted input: whoever ships one ships its manifest, so hashes prove nothing about intent.
``torch.export.load`` is not safe on such input: it unpickles archive members that the archive's own JSON
marks as pickled (weights, constants, example inputs, opaque objects), the program it returns ``exec``\\ s the
archive's guard code when ``.module()`` is called, and torch's deserializer parses every shape expression
with ``sympy.sympify`` (an ``eval``). lowbit therefore reads the archive itself:

1. the zip's member names must be the ones ``torch.export.save`` writes; members marked as pickled, opaque
   objects (``custom_obj``) and non-empty guard code are refused; the weight, constant and example-input
   members are never read (lowbit stores placeholders there; the bytes live in safetensors);
2. the JSON graph is checked against what lowbit writes: every operator is an ``aten`` or ``lowbit`` op (or
   ``operator.getitem``); every shape expression is a sympy ``srepr`` made only of ``Symbol``, ``Integer``,
   ``Add``, ``Mul``, ``Pow`` and the integer functions torch uses, checked by parsing it with :mod:`ast`
   (never evaluated) before torch sees it; node metadata keeps only inert strings;
3. torch's JSON deserializer then builds the program from that JSON and the tensors lowbit read from its
   safetensors files (no ``torch.load``, no ``pickle``).

Any violation raises :class:`ProgramError` naming the member, node or field; nothing in the archive runs.
"""

from __future__ import annotations

import ast
import json
import re
import zipfile
import zlib
from pathlib import Path

import torch


class ProgramError(ValueError):
    """``program.pt2`` holds something lowbit does not write (or cannot read safely)."""


# archive members torch.export.save writes, after the archive's top folder
_MEMBERS = re.compile(r"^(models/[A-Za-z0-9_]+\.json|data/(weights|constants|sample_inputs)/[A-Za-z0-9_.]+|"
                      r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|"
                      r"extra/[A-Za-z0-9_.]+)$")
_TARGET = re.compile(r"^torch\.ops\.(aten|lowbit)\.[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*$")
_PLAIN_TARGETS = {"_operator.getitem"}
# sympy constructors that appear in torch.export's shape expressions (srepr), and their keyword assumptions
_SYMPY_CALLS = {"Symbol", "Integer", "Rational", "Add", "Mul", "Pow", "Max", "Min", "FloorDiv", "CeilDiv", "Mod",
                "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "ModularIndexing", "IntTrueDiv", "Abs",
                "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not"}
_SYMPY_NAMES = {"true", "false", "oo", "zoo", "nan", "S"}
_SYMPY_KEYWORDS = {"positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "zero",
                   "nonzero", "even", "odd", "commutative"}
_SYMBOL = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# node metadata torch's deserializer keeps as plain strings (others are dropped before deserializing)
_INERT_METADATA = ("stack_trace", "nn_module_stack", "torch_fn", "from_node")


def _check_sympy(expr: str, where: str) -> None:
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as e:
        raise ProgramError(f"{where}: shape expression {expr[:80]!r} is not a sympy expression ({e.msg})") from None

    def ok(node) -> bool:
        if isinstance(node, ast.Constant):
            return isinstance(node.value, (int, bool)) or (isinstance(node.value, str) and bool(_SYMBOL.match(node.value)))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return isinstance(node.operand, ast.Constant) and type(node.operand.value) is int
        if isinstance(node, ast.Name):
            return node.id in _SYMPY_NAMES
        if isinstance(node, ast.Call):
            return (isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS and all(ok(a) for a in node.args)
                    and all(k.arg in _SYMPY_KEYWORDS and isinstance(k.value, ast.Constant)
                            and isinstance(k.value.value, bool) for k in node.keywords))
        return False

    if not ok(tree.body):
        raise ProgramError(f"{where}: shape expression {expr[:80]!r} holds something other than sympy integers, "
                           "symbols and arithmetic; refused (it would be evaluated)")


def _check_json(doc: dict, member: str) -> None:
    """Walk the serialized program: operators, shape expressions, opaque objects, guard code, metadata."""
    if not isinstance(doc, dict) or not isinstance(doc.get("graph_module"), dict):
        raise ProgramError(f"{member}: not a serialized exported program (no graph_module)")
    if doc.get("guards_code"):
        raise ProgramError(f"{member}: the program carries guard code ({len(doc['guards_code'])} lines), which "
                           "torch would execute; lowbit never writes any; refused")
    rc = doc.get("range_constraints") or {}
    if not isinstance(rc, dict) or not all(isinstance(k, str) and _SYMBOL.match(k) for k in rc):
        raise ProgramError(f"{member}: range_constraints names something other than shape symbols; refused")

    def walk(o, path: str) -> None:
        if isinstance(o, dict):
            if "target" in o and "inputs" in o and "outputs" in o:  # a graph node
                t = o["target"]
                if not isinstance(t, str) or not (_TARGET.match(t) or t in _PLAIN_TARGETS):
                    raise ProgramError(f"{member}: node {o.get('name', '?')!r} calls {str(t)[:80]!r}; lowbit programs "
                                       "call only aten and lowbit operators; refused")
                md = o.get("metadata")
                if isinstance(md, dict):
                    o["metadata"] = {k: v for k, v in md.items() if k in _INERT_METADATA and isinstance(v, str)}
            for k, v in o.items():
                if k == "expr_str":
                    if not isinstance(v, str):
                        raise ProgramError(f"{member}: {path}: expr_str is not a string")
                    _check_sympy(v, f"{member}: {path}")
                elif k == "as_operator":
                    if not isinstance(v, str) or not (_TARGET.match(v) or v in _PLAIN_TARGETS):
                        raise ProgramError(f"{member}: {path} names operator {str(v)[:80]!r}; refused")
                elif k in ("as_custom_obj", "custom_obj", "custom_obj_values") and v:
                    raise ProgramError(f"{member}: {path} holds an opaque (pickled) object; lowbit never writes "
                                       "one and never unpickles; refused")
                else:
                    walk(v, f"{path}/{k}")
        elif isinstance(o, list):
            for v in o:
                walk(v, path)

    walk(doc["graph_module"], "graph_module")


def _placeholder_shapes(doc: dict) -> dict[str, list]:
    """``{state_dict/constant name: [sizes]}`` from the graph's placeholders (static sizes; None for symbolic)."""
    g = doc["graph_module"]
    values = g["graph"].get("tensor_values", {})
    out = {}
    for spec in g["signature"]["input_specs"]:
        (kind, v), = spec.items()
        name = v.get("parameter_name") or v.get("buffer_name") or v.get("tensor_constant_name")
        if name is not None and v["arg"]["name"] in values:
            out[name] = [s.get("as_int") for s in values[v["arg"]["name"]]["sizes"]]
    return out


def _read_archive(path: Path) -> dict:
    """The checked ``models/model.json`` of the archive (after its member names and pickle flags are checked)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            tops = {n.split("/", 1)[0] for n in names}
            if len(tops) != 1:
                raise ProgramError(f"{path}: archive has {len(tops)} top folders, expected one")
            top = tops.pop()
            for n in names:
                rest = n[len(top) + 1:]
                if n.endswith("/") or not _MEMBERS.match(rest):
                    raise ProgramError(f"{path}: unexpected archive member {n!r}; refused")
            models = [n for n in names if n.startswith(f"{top}/models/")]
            if models != [f"{top}/models/model.json"]:
                raise ProgramError(f"{path}: expected exactly one program (models/model.json), found {models}")
            for cfg in (f"{top}/data/weights/model_weights_config.json",
                        f"{top}/data/constants/model_constants_config.json"):
                if cfg in names:
                    try:
                        entries = json.loads(zf.read(cfg))["config"]
                        pickled = [k for k, v in entries.items() if not isinstance(v, dict) or v.get("use_pickle")]
                    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
                        raise ProgramError(f"{path}: {cfg} is not a valid tensor index ({e})") from None
                    if pickled:
                        raise ProgramError(f"{path}: archive member {cfg} marks {pickled[0]!r} as pickled; lowbit "
                                           "never unpickles artifact contents (rebuild the artifact with lowbit-compile)")
            raw = zf.read(f"{top}/models/model.json")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, ValueError) as e:
        if isinstance(e, ProgramError):
            raise
        raise ProgramError(f"{path}: not a readable torch.export archive ({type(e).__name__}: {e})") from None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProgramError(f"{path}: models/model.json is not valid JSON ({e})") from None


def _inputs(doc: dict, path: Path, tensors: dict) -> tuple[dict, dict]:
    """``(state_dict, constants)`` for the program's inputs, from ``tensors``; shapes checked against the graph."""
    state_dict, constants = {}, {}
    for spec in doc["graph_module"]["signature"]["input_specs"]:
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ProgramError(f"{path}: malformed input spec {str(spec)[:80]}")
        (kind, v), = spec.items()
        if kind == "parameter":
            name = v["parameter_name"]
            target, wrap = state_dict, True
        elif kind == "buffer":
            name = v["buffer_name"]
            target, wrap = (state_dict if v.get("persistent", True) else constants), False
        elif kind == "tensor_constant":
            name = v["tensor_constant_name"]
            target, wrap = constants, False
        elif kind in ("user_input", "constant_input", "token"):
            continue
        else:
            raise ProgramError(f"{path}: program input of kind {kind!r}; lowbit programs take only tensors; refused")
        if name not in tensors:
            raise ProgramError(f"{path}: program {kind} {name} has no tensor in the artifact")
        t = tensors[name]
        target[name] = torch.nn.Parameter(t, requires_grad=False) if wrap else t
    for name, sizes in _placeholder_shapes(doc).items():
        t = tensors.get(name)
        if t is not None and (len(sizes) != t.dim() or any(s is not None and s != d for s, d in zip(sizes, t.shape))):
            raise ProgramError(f"{path}: program parameter {name} expects shape {sizes}, artifact has {list(t.shape)}")
    return state_dict, constants


def read_program(path: Path, tensors: dict[str, torch.Tensor]) -> torch.export.ExportedProgram:
    """The exported program of ``path`` (a lowbit ``program.pt2``) with ``tensors`` as its weights and constants.

    ``tensors``: every parameter, buffer and tensor constant of the program by name, in the program's dtypes.
    Raises :class:`ProgramError` for anything lowbit does not write (see the module docstring).
    """
    path = Path(path)
    try:
        doc = _read_archive(path)
        _check_json(doc, f"{path}:models/model.json")
        state_dict, constants = _inputs(doc, path, tensors)
    except ProgramError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as e:  # JSON of the wrong shape
        raise ProgramError(f"{path}: malformed program JSON ({type(e).__name__}: {e})") from None

    from torch._export.serde.serialize import SerializedArtifact, deserialize

    try:
        return deserialize(SerializedArtifact(json.dumps(doc).encode(), state_dict, constants, b""))
    except Exception as e:  # a well-formed but inconsistent graph: torch's own verifier says what is wrong
        raise ProgramError(f"{path}: cannot rebuild the exported program: {type(e).__name__}: {e}") from e
