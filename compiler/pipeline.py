"""The compile pipeline as a library call: load -> calibrate -> capture -> passes -> lower -> artifact.

``compile_model(CompileOptions(...))`` is what ``lowbit-compile`` runs. Cheap checks (options, output
directory, data files) happen before the model is loaded, so bad input fails in seconds. The artifact
is written under a hidden temporary name and renamed only when complete.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lowbit import __version__
from lowbit.passes import PassContext, PassManager, default_passes
from lowbit.passes.base import PassError
from lowbit.passes.methods import build_method
from lowbit.runtime import artifact as art

from . import capture, data, models
from . import report as report_mod
from .calibrate import Engine
from .errors import LowbitError
from .evaluate import perplexity

TARGETS = ("torch", "onnx", "mlir")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class CompileOptions:
    model: str
    method: str = "gptq"
    method_options: dict = field(default_factory=dict)  # e.g. bits, group_size, symmetric, damp
    output: str | None = None
    overwrite: bool = False
    target: str = "torch"
    calib: str = "c4"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    eval: tuple = ()  # ("wikitext2", "c4")
    eval_windows: int | None = None
    eval_seqlen: int = 2048
    eval_float: bool = True
    float_dtype: str = "float16"  # storage dtype of the parameters that stay float
    progress: bool = True
    onnx_accuracy_level: int = 4  # MatMulNBits accuracy_level for --target onnx (4 = int8 activations)
    # Per-module overrides (lowbit.compiler.overrides): a .json/.toml path or a list of rule dicts.
    overrides: object = None
    resume: bool = False  # continue a training method's interrupted run from OUTPUT.ckpt/
    # The user's own passes (objects with ``name`` and ``run(gm, ctx) -> PassReport``), run after lowbit's.
    extra_passes: tuple = ()


def default_output(opts: CompileOptions, tag: str) -> Path:
    name = Path(opts.model).stem if os.sep in opts.model or opts.model.endswith(".gguf") else opts.model
    return Path("out") / f"{name}-{opts.method}-{tag}"


class _Timer:
    def __init__(self):
        self.times = {}

    def stage(self, name):
        timer = self

        class _S:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.times[name] = timer.times.get(name, 0.0) + time.perf_counter() - self.t0

        return _S()


def compile_model(opts: CompileOptions) -> dict:
    """Run the whole pipeline; returns the report dict (also written into the artifact)."""
    say = log if opts.progress else (lambda m: None)
    t_all = time.perf_counter()
    # -- cheap validation first ----------------------------------------------------------------------
    if opts.target not in TARGETS:
        raise LowbitError(f"--target must be one of {TARGETS}, got {opts.target!r}")
    try:
        method = build_method(opts.method, **opts.method_options)
    except (ValueError, TypeError) as e:
        raise LowbitError(str(e)) from e
    plan = None
    if opts.overrides is not None:
        from .overrides import MethodPlan, load_rules, parse_rules

        rules = parse_rules(opts.overrides) if isinstance(opts.overrides, list) else load_rules(opts.overrides)
        plan = MethodPlan(method, opts.method_options, rules)
    tag = method.config.tag() if hasattr(method.config, "tag") else opts.method
    if plan is not None:
        tag += "-overrides"
    out = Path(opts.output) if opts.output else default_output(opts, tag)
    if out.exists() and not opts.overwrite:
        raise LowbitError(f"output directory {out} already exists (use --overwrite to replace it)")
    ckpt_dir = out.with_name(out.name + ".ckpt")
    if hasattr(method, "checkpoint_dir"):  # training methods checkpoint beside the output
        if ckpt_dir.exists() and not opts.resume and not opts.overwrite:
            raise LowbitError(f"{ckpt_dir} holds checkpoints of an earlier run: pass --resume to continue it or "
                              "--overwrite to restart")
        method.checkpoint_dir, method.resume = ckpt_dir, opts.resume
    elif opts.resume:
        raise LowbitError(f"--resume applies to methods with per-block checkpoints (efficientqat, reallm); "
                          f"{opts.method} has none")
    float_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": None}.get(opts.float_dtype, "bad")
    if float_dtype == "bad":
        raise LowbitError(f"--float-dtype must be float16, bfloat16 or float32, got {opts.float_dtype!r}")
    models.resolve(opts.model)
    data.load_text(opts.calib, "calib")
    for e in opts.eval:
        data.load_text(e, "eval")
    if opts.eval_windows is not None and opts.eval_windows < 1:
        raise LowbitError("--eval-windows must be >= 1")

    timer = _Timer()
    with timer.stage("load"):
        say(f"[load] {opts.model}")
        model, tokenizer, src = models.load(opts.model)
    if plan is not None:
        plan.precheck(n for n, m in model.named_modules() if models.is_linear_like(m))
    float_params = {id(p): p for p in model.parameters()}
    n_params = sum(p.numel() for p in float_params.values())

    report = {
        "lowbit_version": __version__,
        "model": {"id": src.model_id, "source": str(src.path), "kind": src.kind, "class": type(model).__name__,
                  "params": n_params},
        "method": {**method.describe(), "tag": tag,
                   **({"overrides": [r.describe() for r in plan.rules]} if plan is not None else {})},
        "eval": {},
    }
    eval_tokens = {}
    for e in opts.eval:
        eval_tokens[e] = data.eval_tokens(tokenizer, e)
        if opts.eval_float:
            with timer.stage("eval float"):
                r = perplexity(lambda ids: model(input_ids=ids, use_cache=False).logits, eval_tokens[e][0],
                               opts.eval_seqlen, opts.eval_windows, label=f"eval {e} float", progress=opts.progress)
            report["eval"][e] = {"data": eval_tokens[e][1], "before": r}
            say(f"[eval] {e} float perplexity {r['ppl']:.3f} over {r['windows']} windows")

    with timer.stage("data"):
        windows, calib_info = data.calibration_windows(tokenizer, opts.calib, opts.nsamples, opts.seqlen, opts.seed)
    report["calibration"] = calib_info
    with timer.stage("calibrate"):
        say(f"[calibrate] {opts.method} {tag} on {windows.shape[0]} x {windows.shape[1]} tokens of {calib_info['source']}")
        needs_data = plan.needs_data if plan is not None else method.needs_data
        try:
            cal = Engine(model, method, windows if needs_data else None, progress=opts.progress, plan=plan).run()
        except ValueError as e:  # a method's training refusal (NaN loss, mismatched checkpoint)
            raise LowbitError(str(e)) from e
    if hasattr(method, "after_calibration"):  # end-to-end phases over the whole quantized model
        with timer.stage(f"{opts.method} end-to-end"):
            try:
                cal.results = method.after_calibration(model, cal.results, windows, opts.progress)
            except ValueError as e:
                raise LowbitError(str(e)) from e
    with timer.stage("export"):
        ep = capture.capture(model)
        gm = ep.module()
    with timer.stage("passes"):
        ctx = PassContext(results=cal.results, float_weights=cal.float_weights, calib_batch=windows[:1])
        try:
            reports = PassManager([*default_passes(), *opts.extra_passes], log=say).run(gm, ctx)
        except PassError as e:  # nothing has been written yet
            raise LowbitError(str(e)) from e
        del ep
    with timer.stage("lower"):
        program = capture.recapture(gm)

    layers = {}
    for name, fmt in cal.results.items():
        layers[name] = {**fmt.meta(), "nbytes": fmt.nbytes(), "bits_per_weight": fmt.bits_per_weight(),
                        **ctx.metrics.get(name, {}), **cal.info.get(name, {})}
    comp_params = sum(f.in_features * f.out_features for f in cal.results.values())
    comp_bytes = sum(f.nbytes() for f in cal.results.values())
    manifest_extra = {
        "model": report["model"],
        "method": report["method"],
        "calibration": calib_info,
        "versions": {"lowbit": __version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__, "python": platform.python_version()},
        "float_storage_dtype": opts.float_dtype,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    attrs = {m: v["attrs"] for m, v in ctx.replaced.items()}
    try:
        with art.staging_dir(out, overwrite=opts.overwrite) as tmp:
            with timer.stage("save"):
                art.write(tmp, program, cal.results, attrs, manifest_extra, float_dtype=float_dtype)
                tokenizer.save_pretrained(str(tmp / "tokenizer"))
                # The architecture, so that lowerings can rebuild graphs the program does not hold
                # (the ONNX decoder with a key/value cache).
                model.config.save_pretrained(str(tmp / "model_config"))
                loaded = art.load(tmp)  # what ships is what we evaluate
            packed_file = (tmp / art.PACKED_FILE).stat().st_size
            artifact_bytes = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
            for e in opts.eval:
                with timer.stage("eval quantized"):
                    r = perplexity(loaded, eval_tokens[e][0], opts.eval_seqlen, opts.eval_windows,
                                   label=f"eval {e} {opts.method}", progress=opts.progress)
                report["eval"].setdefault(e, {"data": eval_tokens[e][1]})["after"] = r
                say(f"[eval] {e} {opts.method} {tag} perplexity {r['ppl']:.3f}")
            report.update({
                "calibration": calib_info,
                "passes": [r.to_json() for r in reports],
                "layers": layers,
                "summary": {
                    "compressed_linears": len(cal.results),
                    "compressed_params": comp_params,
                    "bits_per_weight": 8 * comp_bytes / max(comp_params, 1),
                    "bits_per_weight_on_disk": 8 * packed_file / max(comp_params, 1),
                    # The papers' narrower count: code/sign bits only (no scales, zeros, masks).
                    "code_bits_per_weight": sum(f.paper_bits_per_weight() * f.in_features * f.out_features
                                                for f in cal.results.values()) / max(comp_params, 1),
                    "linears_packed_bytes": comp_bytes,
                    "linears_fp16_bytes": 2 * comp_params,
                    "packed_file_bytes": packed_file,
                    "float_fp16_bytes": 2 * n_params,
                    "float_fp32_bytes": 4 * n_params,
                    "artifact_bytes": artifact_bytes,
                    "output": str(out),
                },
            })
            if opts.target == "onnx":
                from .onnx_export import export_artifact

                with timer.stage("onnx"):
                    report["onnx"] = export_artifact(tmp, accuracy_level=opts.onnx_accuracy_level, progress=say)
            if opts.target == "mlir":
                from . import mlir_export

                with timer.stage("mlir"):
                    report["mlir"] = mlir_export.export_artifact(tmp, progress=say)
            if getattr(method, "e2e_report", None):
                report["end_to_end"] = method.e2e_report
            report["times"] = {**timer.times, "total": time.perf_counter() - t_all}
            report_mod.write(report, tmp)
    except FileExistsError as e:
        raise LowbitError(str(e)) from e
    report["summary"]["output"] = str(out)
    if hasattr(method, "checkpoint_dir"):  # the artifact is complete: the checkpoints have served
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return report


def summary_text(report: dict) -> str:
    s = report["summary"]
    mb = 1 << 20
    lines = [
        f"lowbit: {report['model']['id']} -> {s['output']}  ({report['method']['method']} {report['method']['tag']})",
        f"  compressed linears : {s['compressed_linears']} ({s['compressed_params']:,} weights)",
        f"  bits per weight    : {s['bits_per_weight']:.3f} with scales/zeros counted "
        f"({s['bits_per_weight_on_disk']:.3f} from {s['packed_file_bytes']:,} bytes on disk; codes/signs alone {s['code_bits_per_weight']:.3f})",
        f"  linears            : {s['linears_fp16_bytes'] / mb:.1f} MiB fp16 -> {s['linears_packed_bytes'] / mb:.1f} MiB packed",
        f"  checkpoint         : {s['float_fp16_bytes'] / mb:.1f} MiB fp16 ({s['float_fp32_bytes'] / mb:.1f} MiB fp32) "
        f"-> artifact {s['artifact_bytes'] / mb:.1f} MiB",
    ]
    for k, v in report.get("eval", {}).items():
        b, a = v.get("before"), v.get("after")
        w = (a or b)
        lines.append(f"  perplexity {k:9s}: {b['ppl']:.3f} -> " if b else f"  perplexity {k:9s}: (float skipped) -> ")
        lines[-1] += f"{a['ppl']:.3f}" if a else "n/a"
        lines[-1] += f"  ({w['windows']} windows x {w['seqlen']} tokens)"
    lines.append("  time               : " + ", ".join(f"{k} {v:.1f}s" for k, v in report["times"].items()))
    return "\n".join(lines)
