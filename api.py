"""lowbit's public Python API: the same pipeline as ``lowbit-compile``, one step at a time, for build scripts.

Typical use (see ``examples/compile_and_lower.py``)::

    import lowbit.api as lb

    model, tok, src = lb.load_model("smollm2-135m")                 # HF dir, .gguf, or alias
    windows, info = lb.calibration_data(tok, "c4", nsamples=128, seqlen=512)
    cal = lb.calibrate(model, "gptq", windows, bits=2, group_size=64,
                       overrides=[{"match": "lm_head", "bits": 4}, {"match": "layers.0.*", "bits": 4}])
    gm = lb.capture(model)                                           # torch.export -> GraphModule
    reports = lb.run_passes(gm, cal, ["find-linear-sites", "replace-linears", MyPass(), "clean-up"])
    lb.save("out/my-model", gm, cal, tok, model)                     # artifact directory (atomic)
    lb.lower("out/my-model", "onnx")                                 # or "mlir"
    art = lb.load("out/my-model"); logits = art(input_ids)

Passes are lowbit's by name (:data:`lowbit.passes.PASS_NAMES`) or any object with ``name`` and
``run(gm, ctx) -> PassReport``; a pass that raises or leaves a malformed graph raises
:class:`lowbit.passes.PassError` naming it and the passes that ran before it, and nothing is written.
For the whole pipeline in one call use :func:`compile` (= ``lowbit-compile``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lowbit.errors import LowbitError  # noqa: F401  (re-exported)
from lowbit.passes.base import PassContext, PassError, PassManager, PassReport  # noqa: F401
from lowbit.passes.registry import PASS_NAMES, pass_by_name
from lowbit.runtime.artifact import ArtifactError, load  # noqa: F401

__all__ = ["load_model", "calibration_data", "calibrate", "capture", "run_passes", "save", "lower", "load",
           "compile", "PASS_NAMES", "PassContext", "PassError", "PassReport", "LowbitError", "ArtifactError"]


def load_model(spec: str):
    """``(model, tokenizer, source)`` for a Hugging Face directory, a ``.gguf`` file or an alias."""
    from lowbit.compiler.engine import models

    return models.load(spec)


def calibration_data(tokenizer, spec: str = "c4", nsamples: int = 128, seqlen: int = 512, seed: int = 0):
    """``(windows (nsamples, seqlen) token ids, info with hashes)`` from c4 or a .txt/.jsonl file."""
    from lowbit.compiler.engine import data

    return data.calibration_windows(tokenizer, spec, nsamples, seqlen, seed)


def calibrate(model, method: str, windows=None, overrides=None, progress: bool = True, **options):
    """Run a method block by block (``options``: the method's config, e.g. ``bits``, ``group_size``).

    ``overrides``: rule dicts or a .toml/.json path (:mod:`lowbit.compiler.engine.overrides`). Returns a
    :class:`~lowbit.compiler.engine.calibrate.Calibration` (formats by module name); the model keeps float weights.
    Methods with an end-to-end phase (``efficientqat``'s E2E-QP) run it here too, without checkpoints."""
    from lowbit.compiler.engine.calibrate import Engine
    from lowbit.compiler.engine.overrides import MethodPlan, load_rules, parse_rules
    from lowbit.passes.methods import build_method

    m = build_method(method, **options)
    plan = None
    if overrides is not None:
        rules = parse_rules(overrides) if isinstance(overrides, list) else load_rules(overrides)
        plan = MethodPlan(m, options, rules)
    needs = plan.needs_data if plan else m.needs_data
    if needs and windows is None:
        raise LowbitError(f"method {method!r} needs calibration windows (see calibration_data)")
    if hasattr(m, "after_calibration") and windows is None:
        raise LowbitError(f"method {method!r} trains end to end and needs windows (see calibration_data)")
    cal = Engine(model, m, windows if needs else None, progress=progress, plan=plan).run()
    if hasattr(m, "after_calibration"):  # end-to-end phases (EfficientQAT's E2E-QP)
        cal.results = m.after_calibration(model, cal.results, windows, progress)
    return cal


def capture(model) -> torch.fx.GraphModule:
    """The float model as a graph module (``input_ids -> logits``, dynamic batch and sequence)."""
    from lowbit.compiler.engine import capture as cap

    return cap.capture(model).module()


def run_passes(gm, calibration, passes=None, calib_batch=None, log=print) -> list:
    """Run passes (names or objects; default: lowbit's ``find-linear-sites -> replace-linears -> verify ->
    clean-up``) on ``gm`` with the calibration results; returns their :class:`PassReport` s."""
    from lowbit.passes import default_passes

    ps = default_passes() if passes is None else [pass_by_name(p) if isinstance(p, str) else p for p in passes]
    ctx = PassContext(results=calibration.results, float_weights=calibration.float_weights, calib_batch=calib_batch)
    reports = PassManager(ps, log=log).run(gm, ctx)
    gm._lowbit_ctx = ctx  # what save() needs: the graph attributes of each packed tensor
    return reports


def save(output, gm, calibration, tokenizer=None, model=None, overwrite: bool = False,
         float_dtype: torch.dtype | None = torch.float16) -> Path:
    """Write an artifact directory from a rewritten graph module (atomic: staged, then renamed)."""
    from lowbit.compiler.engine.capture import recapture
    from lowbit.runtime import artifact as art
    from lowbit.version import __version__

    ctx = getattr(gm, "_lowbit_ctx", None)
    if ctx is None or not ctx.replaced:
        raise LowbitError("save(): run the replace-linears pass on this graph module first (run_passes)")
    program = recapture(gm)
    attrs = {m: v["attrs"] for m, v in ctx.replaced.items()}
    extra = {"model": {"id": getattr(getattr(model, "config", None), "_name_or_path", "") or ""},
             "method": {"api": True}, "versions": {"lowbit": __version__, "torch": torch.__version__},
             "float_storage_dtype": str(float_dtype).replace("torch.", "") if float_dtype else "float32"}
    out = Path(output)
    with art.staging_dir(out, overwrite=overwrite) as tmp:
        art.write(tmp, program, {k: calibration.results[k] for k in attrs}, attrs, extra, float_dtype=float_dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
        if model is not None and hasattr(model, "config"):
            model.config.save_pretrained(str(tmp / "model_config"))
        art.load(tmp)  # validate what ships
    return out


def lower(artifact_dir, target: str, **kwargs) -> dict:
    """Lower an artifact: ``target`` ``"onnx"`` (kwargs of :func:`lowbit.compiler.lowering.onnx.export_artifact`)
    or ``"mlir"`` (kwargs of :func:`lowbit.compiler.lowering.mlir.export_artifact`)."""
    if target == "onnx":
        from lowbit.compiler.lowering.onnx_artifact import export_artifact
    elif target == "mlir":
        from lowbit.compiler.lowering.mlir import export_artifact
    else:
        raise LowbitError(f"target must be 'onnx' or 'mlir', got {target!r}")
    return export_artifact(artifact_dir, **kwargs)


def compile(model: str, method: str = "gptq", output=None, **kwargs) -> dict:  # noqa: A001
    """The whole ``lowbit-compile`` pipeline; ``kwargs`` are :class:`~lowbit.compiler.frontend.pipeline.CompileOptions`
    fields (``method_options``, ``overrides``, ``extra_passes``, ``target``, ``eval``, ...). Returns the report."""
    from lowbit.compiler.frontend.pipeline import CompileOptions, compile_model

    return compile_model(CompileOptions(model=model, method=method, output=output, **kwargs))
