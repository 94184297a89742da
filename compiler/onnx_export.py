"""ONNX lowering of an artifact: ``DIR/onnx/model.onnx`` (+ ``model.onnx.data``) and ``DIR/onnx/export.json``.

Pipeline: load the artifact's program -> ``to-matmulnbits`` pass (uniform 2/4/8-bit weights repacked to
ONNX Runtime's layout) -> ``torch.onnx.export(..., dynamo=True, custom_translation_table=...)`` with the
translations of :mod:`lowbit.runtime.onnx_functions` -> external data -> validation in ONNX Runtime
against the torch program on the same input. Written to a hidden staging folder and renamed when
complete, like artifacts.

Two graphs can be exported (``kv_cache``): ``model.onnx`` takes ``input_ids`` and returns ``logits``
(prefill / perplexity), ``decoder.onnx`` also takes and returns the key/value cache so generation is one
token per step (see :mod:`lowbit.compiler.kv_export`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .errors import LowbitError

ONNX_DIR = "onnx"
MODEL_FILE = "model.onnx"
EXPORT_JSON = "export.json"
FP16_MIN_ELEMENTS = 1 << 20  # float tensors at least this large are stored in fp16 (see save_model)
OPSET = 18  # the exporter's own opset (torchlib); asking for another runs a version converter that
# inlines (and breaks on) the lowbit functions
IR_VERSION = 10  # what ONNX Runtime 1.2x loads


def _onnx_program(ep, args, accuracy_level: int, input_names, output_names, dynamic_shapes=None):
    from lowbit.runtime.onnx_functions import translation_table

    return torch.onnx.export(
        ep, args, dynamo=True, custom_translation_table=translation_table(accuracy_level),
        opset_version=None, input_names=input_names, output_names=output_names,
        dynamic_shapes=dynamic_shapes,
        # No graph optimization: constant folding would expand the packed weights into float copies.
        optimize=False, verbose=False,
    )


# At accuracy_level 4 ORT quantizes activations to int8 per weight block: 32-column blocks (our groups split, each
# repeating its scale/zero) keep SmolLM2's GPTQ w4g128 perplexity in ORT close to torch (measured in the notes).
INT8_MAX_BLOCK = 32


def lower_program(program: torch.export.ExportedProgram, matmulnbits: bool = True, outliers: dict | None = None,
                  max_block: int | None = None):
    """Apply the ORT-layout pass to a lowbit program; returns ``(ExportedProgram, PassReport, gm)``."""
    from lowbit.passes.base import PassContext
    from lowbit.passes.ort_layout import ToMatMulNBits

    from .capture import recapture

    gm = program.module()
    rep = None
    if matmulnbits:
        rep = ToMatMulNBits(outlier_channels=outliers, max_block=max_block).run(gm, PassContext())
    return recapture(gm), rep, gm


def find_activation_outliers(art, spec: str | None, progress=print) -> dict:
    """Massive input channels per uniform layer, measured on 4 x 512 tokens of ``spec`` (c4 or a file)."""
    if not spec or spec == "none":
        return {}
    from lowbit.passes.ort_layout import activation_outliers

    from . import data

    try:
        windows, _ = data.calibration_windows(art.tokenizer, spec, 4, 512, 0)
    except LowbitError as e:
        progress(f"[onnx] no activation statistics ({e}); int8 activations keep every channel")
        return {}
    out = activation_outliers(art.program.module(), [windows[i : i + 1] for i in range(windows.shape[0])])
    progress(f"[onnx] activation outliers: {sum(len(v) for v in out.values())} channels in {len(out)} layers "
             "kept out of the int8 path")
    return out


def save_model(onnx_program, path: Path, float16_storage: bool = True) -> None:
    """Save with every initializer in ``<name>.data`` (packed bytes stay packed; no 2 GB protobuf limit).

    ``float16_storage``: large float32 tensors that stay float (embeddings, lm_head) are stored in fp16 with a
    ``Cast`` to float32 in front, as the artifact stores them (``--float-dtype float16``); ONNX Runtime folds
    the cast when it loads the model. Node doc strings and metadata (stack traces) are dropped.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from lowbit.runtime.onnx_functions import attach_functions

    model = attach_functions(onnx_program.model_proto)
    model.ir_version = min(model.ir_version, IR_VERSION)
    g = model.graph
    for n in g.node:
        n.doc_string = ""
        del n.metadata_props[:]
    if float16_storage:
        casts = []
        for i, t in enumerate(list(g.initializer)):
            if t.data_type == onnx.TensorProto.FLOAT and int(np.prod(t.dims)) >= FP16_MIN_ELEMENTS:
                name = t.name
                arr = numpy_helper.to_array(t).astype(np.float16)
                g.initializer[i].CopyFrom(numpy_helper.from_array(arr, name + "__fp16"))
                casts.append(helper.make_node("Cast", [name + "__fp16"], [name], to=onnx.TensorProto.FLOAT,
                                              name=f"storage_cast_{name}"))
        for c in reversed(casts):
            g.node.insert(0, c)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=0)


def export_artifact(artifact_dir, accuracy_level: int = 4, matmulnbits: bool = True, kv_cache: bool = True,
                    overwrite: bool = False, check: bool = True, outlier_data: str | None = "c4",
                    progress=print) -> dict:
    """Export an artifact directory to ONNX under ``DIR/onnx``; returns the export summary."""
    from lowbit.runtime.artifact import load

    from .kv_export import export_decoder

    if accuracy_level not in (0, 1, 2, 3, 4):
        raise LowbitError(f"--accuracy-level must be 0-4, got {accuracy_level}")
    artifact_dir = Path(artifact_dir)
    art = load(artifact_dir)
    final = artifact_dir / ONNX_DIR
    if final.exists() and not overwrite:
        raise LowbitError(f"{final} already exists (use --overwrite to replace it)")
    t0 = time.perf_counter()
    from lowbit.runtime.artifact import staging_dir

    with staging_dir(final, overwrite=True) as tmp:
        progress(f"[onnx] lowering {artifact_dir} (MatMulNBits: {'on' if matmulnbits else 'off'}, "
                 f"accuracy_level {accuracy_level})")
        outliers = find_activation_outliers(art, outlier_data, progress) if matmulnbits and accuracy_level == 4 else {}
        max_block = INT8_MAX_BLOCK if accuracy_level == 4 else None
        ep, rep, gm = lower_program(art.program, matmulnbits, outliers, max_block)
        example = (torch.randint(0, 100, (1, 8)),)
        try:
            prog = _onnx_program(ep, example, accuracy_level, ["input_ids"], ["logits"],
                                 dynamic_shapes=({0: "batch", 1: "sequence"},))
        except Exception as e:
            raise LowbitError(f"ONNX export of {artifact_dir} failed: {type(e).__name__}: {e}") from e
        f16 = art.manifest.get("float_storage_dtype", "float16") != "float32"
        save_model(prog, tmp / MODEL_FILE, float16_storage=f16)
        files = [MODEL_FILE, MODEL_FILE + ".data"]
        summary = {"opset": OPSET, "accuracy_level": accuracy_level, "matmulnbits": matmulnbits,
                   "float_storage": "float16" if f16 else "float32",
                   "activation_outliers": {k: v.tolist() for k, v in outliers.items()},
                   "matmulnbits_max_block": max_block,
                   "pass": None if rep is None else rep.to_json(), "graphs": {"prefill": MODEL_FILE}}
        if kv_cache:
            progress("[onnx] exporting the decoder with key/value cache")
            dec = export_decoder(art, tmp, accuracy_level, matmulnbits, float16_storage=f16, outliers=outliers,
                                 max_block=max_block)
            files += [dec["file"], dec["file"] + ".data"]
            summary["graphs"]["decoder"] = dec["file"]
            summary["cache"] = dec["cache"]
        summary["nodes"] = node_counts(tmp / MODEL_FILE)
        if check:
            from lowbit.runtime.onnx_runtime import session

            s = session(tmp, MODEL_FILE)
            ids = torch.randint(0, min(100, art.manifest.get("vocab_size", 100)), (1, 12))
            ref = art(ids).float()
            got = torch.from_numpy(s.run(None, {"input_ids": ids.numpy()})[0])
            err = float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-9))
            summary["check"] = {"max_rel_err_vs_torch": err, "tokens": 12}
            progress(f"[onnx] ONNX Runtime vs torch program: max relative logit error {err:.2e}")
        from lowbit.runtime.artifact import sha256_file

        summary["files"] = {f: {"bytes": (tmp / f).stat().st_size, "sha256": sha256_file(tmp / f)} for f in files}
        summary["seconds"] = time.perf_counter() - t0
        (tmp / EXPORT_JSON).write_text(json.dumps(summary, indent=1))
    return summary


def node_counts(path: Path) -> dict:
    """Count of nodes per ``domain::op`` in the main graph of an ONNX file (weights not loaded)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    out = {}
    for n in m.graph.node:
        key = f"{n.domain or 'ai.onnx'}::{n.op_type}"
        out[key] = out.get(key, 0) + 1
    return out
