"""Calibration and evaluation text.

Built-in sets (from ``shared/data``, found through ``$LOWBIT_DATA`` or next to the repository):

* ``c4``: ``c4/c4_validation_2k.jsonl``; documents 0-999 calibrate, documents 1000-1999 evaluate.
* ``wikitext2``: ``wikitext-2-raw-v1/wiki.test.hf_joined.txt`` (the test split joined with blank lines,
  exactly the string GPTQ-style code evaluates on). Evaluation only: calibrating on it is refused,
  so evaluation text never leaks into calibration.

Any ``.txt`` (one document) or ``.jsonl`` (one ``{"text": ...}`` per line) file also works.

Calibration windows (GPTQ style): with ``random.Random(seed)``, pick a random document longer than the
window and a random start inside it; when no document is long enough, windows are drawn from all
documents joined by blank lines. Evaluation: the text tokenized once, non-overlapping windows.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.runtime.artifact import sha256_file

_C4 = "c4/c4_validation_2k.jsonl"
_WIKI = "wikitext-2-raw-v1/wiki.test.hf_joined.txt"


def data_root() -> Path:
    """Directory holding the shared data sets (``$LOWBIT_DATA`` wins)."""
    env = os.environ.get("LOWBIT_DATA")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parent.parent  # the repository root
    candidates += [here.parent / "shared" / "data", Path.cwd().parent / "shared" / "data", Path.cwd() / "shared" / "data"]
    for c in candidates:
        if (c / _C4).is_file() or (c / _WIKI).is_file():
            return c
    raise LowbitError(
        "built-in data sets not found: set LOWBIT_DATA to the shared/data directory "
        f"(looked in: {', '.join(str(c) for c in candidates)})"
    )


@dataclass
class TextSource:
    name: str
    path: Path
    documents: list[str]
    sha256: str  # of the file bytes
    selection: str  # which documents were used


def _read_file(path: Path) -> list[str]:
    if not path.is_file():
        raise LowbitError(f"text file not found: {path}")
    try:
        return _read_utf8(path)
    except UnicodeDecodeError as e:
        raise LowbitError(f"{path}: not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x}); expected a UTF-8 "
                          ".txt or .jsonl file") from None
    except OSError as e:
        raise LowbitError(f"{path}: cannot read it ({e.strerror})") from None


def _read_utf8(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        docs = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LowbitError(f"{path}:{i}: not valid JSON ({e.msg})") from e
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise LowbitError(f'{path}:{i}: expected an object with a "text" string')
                docs.append(obj["text"])
        return docs
    if path.suffix in (".txt", ".raw", ".text"):
        return [path.read_text(encoding="utf-8")]
    raise LowbitError(f"unsupported text file {path}: expected .txt or .jsonl")


def load_text(spec: str, purpose: str) -> TextSource:
    """Documents for ``purpose`` in ``{"calib", "eval"}`` from a built-in name or a file path."""
    if spec == "c4":
        path = data_root() / _C4
        docs = _read_file(path)
        sel = slice(0, 1000) if purpose == "calib" else slice(1000, 2000)
        return TextSource("c4", path, docs[sel], sha256_file(path), f"documents {sel.start}-{sel.stop - 1}")
    if spec in ("wikitext2", "wikitext-2"):
        if purpose == "calib":
            raise LowbitError("wikitext2 is the evaluation set; calibrate on c4 or your own file (--calib FILE)")
        path = data_root() / _WIKI
        return TextSource("wikitext2", path, _read_file(path), sha256_file(path), "test split, joined")
    path = Path(spec).expanduser()
    if not path.exists():
        raise LowbitError(f"{purpose} data not found: {spec!r} is neither a built-in set (c4, wikitext2) nor a file")
    docs = _read_file(path)
    if not any(d.strip() for d in docs):
        raise LowbitError(f"{purpose} data file {path} is empty")
    return TextSource(path.name, path.resolve(), docs, sha256_file(path), "all documents")


def _encode(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def calibration_windows(tokenizer, spec: str, nsamples: int, seqlen: int, seed: int):
    """``(windows (nsamples, seqlen) long tensor, info dict)``; info carries the data hashes."""
    if nsamples < 1 or seqlen < 2:
        raise LowbitError(f"--nsamples must be >= 1 and --seqlen >= 2 (got {nsamples}, {seqlen})")
    src = load_text(spec, "calib")
    rng = random.Random(seed)
    encoded = [_encode(tokenizer, d) for d in src.documents]
    long_docs = [t for t in encoded if t.numel() > seqlen]
    windows = []
    if long_docs:
        for _ in range(nsamples):
            t = long_docs[rng.randrange(len(long_docs))]
            start = rng.randrange(t.numel() - seqlen)
            windows.append(t[start : start + seqlen])
        how = "random document longer than the window, random start"
    else:
        stream = _encode(tokenizer, "\n\n".join(src.documents))
        if stream.numel() < seqlen:
            raise LowbitError(
                f"calibration data {src.path} has {stream.numel()} tokens, shorter than one window of {seqlen}"
            )
        for _ in range(nsamples):
            start = rng.randrange(stream.numel() - seqlen + 1)
            windows.append(stream[start : start + seqlen])
        how = "random start in all documents joined"
    batch = torch.stack(windows)
    info = {
        "source": src.name,
        "path": str(src.path),
        "file_sha256": src.sha256,
        "selection": src.selection,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "seed": seed,
        "sampling": how,
        "windows_sha256": hashlib.sha256(batch.numpy().tobytes()).hexdigest(),
    }
    return batch, info


def eval_tokens(tokenizer, spec: str):
    """The evaluation text tokenized once (documents joined by blank lines)."""
    src = load_text(spec, "eval")
    ids = _encode(tokenizer, "\n\n".join(src.documents))
    return ids, {"source": src.name, "path": str(src.path), "file_sha256": src.sha256, "selection": src.selection}
