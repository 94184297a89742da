"""ONNX lowering of an artifact: ``DIR/onnx/model.onnx`` (+ ``model.onnx.data``) and ``DIR/onnx/export.json``.

Pipeline: load the artifact's program -> ``to-matmulnbits`` pass (uniform 2/4/8-bit weights repacked to
ONNX Runtime's layout) -> ``torch.onnx.export(..., dynamo=True, custom_translation_table=...)`` with the
translations of :mod:`lowbit.runtime.onnx_functions` -> external data -> validation in ONNX Runtime
against the torch program on the same input. Written to a hidden staging folder and renamed when
complete, like artifacts.

Two graphs can be exported (``kv_cache``): ``model.onnx`` takes ``input_ids`` and returns ``logits``
(prefill / perplexity), ``decoder.onnx`` also takes and returns the key/value cache so generation is one
token per step (see :mod:`lowbit.compiler.lowering.onnx_decoder`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lowbit.errors import LowbitError

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
    from lowbit.compiler.engine.capture import recapture
    from lowbit.passes.base import PassContext
    from lowbit.passes.ort_layout import ToMatMulNBits

    gm = program.module()
    rep = None
    if matmulnbits:
        rep = ToMatMulNBits(outlier_channels=outliers, max_block=max_block).run(gm, PassContext())
    return recapture(gm), rep, gm


def find_activation_outliers(art, spec: str | None, progress=print) -> dict:
    """Massive input channels per uniform layer, measured on 4 x 512 tokens of ``spec`` (c4 or a file)."""
    if not spec or spec == "none":
        return {}
    from lowbit.compiler.engine import data
    from lowbit.passes.ort_layout import activation_outliers

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


def node_counts(path: Path) -> dict:
    """Count of nodes per ``domain::op`` in the main graph of an ONNX file (weights not loaded)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    out = {}
    for n in m.graph.node:
        key = f"{n.domain or 'ai.onnx'}::{n.op_type}"
        out[key] = out.get(key, 0) + 1
    return out
