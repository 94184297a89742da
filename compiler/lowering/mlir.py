"""MLIR lowering of an artifact through torch-mlir: ``DIR/mlir/model.<dialect>.mlirbc`` and ``export.json``.

Pipeline: load the artifact's program -> ``decompose-lowbit`` pass (lowbit ops become integer unpacking plus
matmul in aten ops; the packed tensors stay uint8 / fp16 constants) -> check the decomposed torch graph
against the artifact on a token batch -> ``torch_mlir.fx.export_and_import`` to each requested dialect
(``torch``, ``linalg-on-tensors``, ``tosa``, ``stablehlo``) -> ``verify()`` -> MLIR bytecode. Written to a
staging folder and renamed when complete. ``export.json`` records per dialect the constants' total bytes
by element type, so the packing is visible (uint8 constants ~ the artifact's packed bytes).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch

from lowbit.errors import LowbitError

MLIR_DIR = "mlir"
DIALECTS = ("torch", "linalg-on-tensors", "tosa", "stablehlo")
# torch-mlir's TOSA and StableHLO pipelines need static shapes: those dialects get a graph exported for a
# fixed (batch, sequence) (``static_shape``); torch and linalg-on-tensors keep both dimensions dynamic. If
# torch-mlir still cannot lower a graph to them, the failure is recorded in export.json with its message.
STATIC = ("tosa", "stablehlo")
BEST_EFFORT = STATIC
_BITS = {"ui8": 8, "i8": 8, "si8": 8, "i1": 8, "ui16": 16, "i16": 16, "si16": 16, "f16": 16, "bf16": 16,
         "i32": 32, "si32": 32, "ui32": 32, "f32": 32, "i64": 64, "si64": 64, "f64": 64}
_CONST = re.compile(r"(?:torch\.vtensor\.literal|arith\.constant|tosa\.const|stablehlo\.constant)[^\n]*?"
                    r"(?:tensor|vtensor)<\[?([0-9x,\s]*)\]?,?\s*x?([a-z]+[0-9]+)>")


def decomposed_program(art, static_shape=None):
    """``(ExportedProgram, PassReport)``: the artifact's program with every lowbit op decomposed
    (dynamic batch and sequence, or the fixed ``static_shape = (batch, seq)``)."""
    from lowbit.compiler.engine.capture import recapture
    from lowbit.passes.base import PassContext
    from lowbit.passes.decompose import DecomposeLowbitOps

    gm = art.program.module()
    rep = DecomposeLowbitOps().run(gm, PassContext())
    # torch-mlir's importer looks every buffer up in the state dict: make non-persistent ones (rotary
    # inv_freq) persistent so they are found (their values are unchanged).
    for m in gm.modules():
        m._non_persistent_buffers_set.clear()
    if static_shape is not None:
        with torch.no_grad():
            return torch.export.export(gm, (torch.zeros(static_shape, dtype=torch.long),)), rep
    return recapture(gm), rep


def constant_bytes(asm: str) -> dict:
    """Bytes of the constant tensors in an MLIR module's text (large elements elided), by element type."""
    out: dict = {}
    for m in re.finditer(r"(?:torch\.vtensor\.literal|arith\.constant|tosa\.const|stablehlo\.constant)(.*)", asm):
        line = m.group(1)
        t = re.search(r"(?:!torch\.vtensor<\[([0-9,]*)\],([a-z]+[0-9]+)>|tensor<([0-9x]*?)x?([a-z]+[0-9]+)>)\s*$", line)
        if not t:
            continue
        if t.group(2):
            dims, et = [d for d in t.group(1).split(",") if d], t.group(2)
        else:
            dims, et = [d for d in t.group(3).split("x") if d], t.group(4)
        n = 1
        for d in dims:
            n *= int(d)
        out[et] = out.get(et, 0) + n * _BITS.get(et, 32) // 8
    return out


def export_artifact(artifact_dir, dialects=DIALECTS, overwrite: bool = False, check: bool = True,
                    static_shape=(1, 128), progress=print) -> dict:
    """Lower an artifact directory to MLIR under ``DIR/mlir``; returns the export summary."""
    from torch_mlir import fx

    from lowbit.runtime.artifact import load, staging_dir

    bad = [d for d in dialects if d not in DIALECTS]
    if bad:
        raise LowbitError(f"unknown MLIR dialect(s) {bad}; choose from {DIALECTS}")
    artifact_dir = Path(artifact_dir)
    art = load(artifact_dir)
    final = artifact_dir / MLIR_DIR
    t0 = time.perf_counter()
    with staging_dir(final, overwrite=overwrite) as tmp:  # refuses an existing one without overwrite
        progress(f"[mlir] decomposing the lowbit ops of {artifact_dir}")
        ep, rep = decomposed_program(art)
        summary = {"pass": rep.to_json(), "dialects": {}, "packed_bytes": art.packed_bytes(),
                   "static_shape": list(static_shape)}
        ep_static = None
        if check:
            ids = torch.randint(0, 100, (1, 12))
            ref = art(ids).float()
            got = ep.module()(ids).float()
            summary["check"] = {"max_rel_err_vs_artifact": float((got - ref).abs().max() / ref.abs().max())}
        for d in dialects:
            progress(f"[mlir] torch-mlir -> {d}")
            try:
                if d in STATIC and ep_static is None:
                    ep_static, _ = decomposed_program(art, tuple(static_shape))
                module = fx.export_and_import(ep_static if d in STATIC else ep, output_type=d)
                module.operation.verify()
            except Exception as e:
                msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:500]}"
                if d in BEST_EFFORT:
                    progress(f"[mlir] {d}: not supported by torch-mlir for this graph ({msg})")
                    summary["dialects"][d] = {"error": msg}
                    continue
                raise LowbitError(f"torch-mlir could not lower {artifact_dir} to {d}: {type(e).__name__}: "
                                  f"{str(e)[:2000]}") from e
            f = f"model.{d}.mlirbc"
            with open(tmp / f, "wb") as fh:
                module.operation.write_bytecode(fh)
            asm = module.operation.get_asm(large_elements_limit=16)
            summary["dialects"][d] = {"file": f, "bytes": (tmp / f).stat().st_size,
                                      "shapes": "static " + "x".join(map(str, static_shape)) if d in STATIC
                                      else "dynamic batch, sequence", "constants": constant_bytes(asm)}
        summary["seconds"] = time.perf_counter() - t0
        (tmp / "export.json").write_text(json.dumps(summary, indent=1))
    return summary
