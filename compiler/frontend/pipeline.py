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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowbit.compiler.engine import capture, data, models
from lowbit.compiler.engine import report as report_mod
from lowbit.compiler.engine.calibrate import Engine
from lowbit.compiler.engine.evaluate import perplexity
from lowbit.errors import LowbitError
from lowbit.passes import PassContext, PassManager, default_passes
from lowbit.passes.base import PassError
from lowbit.passes.methods import build_method
from lowbit.runtime import artifact as art
from lowbit.runtime.resources import peak_rss_mib
from lowbit.runtime.output_dir import check_output
from lowbit.version import __version__

TARGETS = ("torch", "onnx", "mlir")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class CompileOptions:
    model: str
    method: str = "gptq"
    method_options: dict = field(default_factory=dict)  # e.g. bits, group_size, symmetric, damp
    # --preset paper's record (lowbit.passes.methods.presets.apply): its settings are already in method_options and
    # the calibration fields; kept for the report and the manifest (method.preset)
    preset: dict | None = None
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
    # Per-module overrides (lowbit.compiler.engine.overrides): a .json/.toml path or a list of rule dicts.
    overrides: object = None
    resume: bool = False  # continue a training method's interrupted run from OUTPUT.ckpt/
    # The output head (and a tied embedding, through the tie-embedding pass): "float", or "4"/"8" bits in
    # 32-column groups, calibrated by the run's method when it is uniform (rtn, gptq), else by GPTQ. Added after
    # the user's --overrides rules, so a rule naming lm_head wins.
    head: str = "float"
    # Block streaming (lowbit.compiler.engine.stream): block weights read from the checkpoint in turn.
    stream: bool = False
    # Where blocks are calibrated and in what precision (lowbit.compiler.engine.device): cpu, cuda, cuda:N, auto;
    # float32, bfloat16, float16 (an autocast; Hessians float32 or wider whatever it is).
    device: str = "cpu"
    compute_dtype: str = "float32"
    # Calibration activations between blocks (lowbit.compiler.engine.activations): auto, device, cpu or disk;
    # disk goes to offload_dir (default: beside the output). Giving offload_dir with auto means disk.
    activations: str = "auto"
    offload_dir: str | None = None
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


class _Run:
    """What the stages of one compile share: the options, and what each stage adds for the next."""

    def __init__(self, opts: CompileOptions, world):
        self.opts = opts
        self.world = world
        self.say = log if opts.progress and world.writer else (lambda m: None)
        self.t_all = time.perf_counter()
        self.timer = _Timer()
        self.report: dict = {}
        self.eval_tokens: dict = {}
        self.streamer = None  # lowbit.compiler.engine.stream.Streamer with --stream
        self.placement = None  # lowbit.compiler.engine.device.Placement: --device, --compute-dtype
        self.store = None  # lowbit.compiler.engine.activations.ActivationStore: --activations, --offload-dir


HEAD_GROUP = 32  # --head: 32-column groups (the tied table is also the embedding: rows read one at a time)


def compile_model(opts: CompileOptions) -> dict:
    """Run the whole pipeline; returns the report dict (also written into the artifact)."""
    from lowbit.compiler.engine import distributed
    from lowbit.compiler.engine.device import Placement, resolve_device, resolve_dtype

    placement = Placement(resolve_device(opts.device), resolve_dtype(opts.compute_dtype))  # before any work
    run = _Run(opts, distributed.from_env(placement.device))  # torchrun: this rank's share of the windows, Hessians all-reduced
    run.placement = placement
    try:
        _check_inputs(run)  # options, output directory, data files: before the model loads, so bad input fails fast
        _load_model(run)
        _evaluate_float(run)
        _calibrate(run)
        if not run.world.writer:  # the other ranks served their windows' statistics; rank 0 writes
            return {"rank": run.world.rank, "world_size": run.world.size}
        _rewrite_graph(run)
        _write_artifact(run)  # staged, reloaded and evaluated as it ships, lowered (--target), renamed when complete
    finally:
        if run.streamer is not None:  # the spill file goes whatever happened
            run.streamer.close()
        if run.store is not None:
            run.store.close()
        run.world.close()
    return run.report


def _check_inputs(run: _Run) -> None:
    opts = run.opts
    if opts.target not in TARGETS:
        raise LowbitError(f"--target must be one of {TARGETS}, got {opts.target!r}")
    try:
        method = build_method(opts.method, **opts.method_options)
    except (ValueError, TypeError) as e:
        raise LowbitError(str(e)) from e
    plan = None
    if opts.head not in ("float", "4", "8"):
        raise LowbitError(f"--head must be float, 4 or 8, got {opts.head!r}")
    if opts.overrides is not None or opts.head != "float":
        from lowbit.compiler.engine.overrides import MethodPlan, load_rules, parse_rules

        rules = [] if opts.overrides is None else (
            parse_rules(opts.overrides) if isinstance(opts.overrides, list) else load_rules(opts.overrides))
        if opts.head != "float" and not any(r.match in ("lm_head", "model.lm_head") for r in rules):
            head = {"match": "lm_head", "bits": int(opts.head), "group_size": HEAD_GROUP}
            if opts.method not in ("rtn", "gptq"):
                head["method"] = "gptq"
            rules += parse_rules([head], source="--head")
            for i, r in enumerate(rules):
                r.index = i
        plan = MethodPlan(method, opts.method_options, rules)
    if not run.placement.default:
        methods = plan.methods if plan is not None else [method]
        slow = sorted({m.name for m in methods if not m.device_ready and not hasattr(m, "quantize_linear")})
        if slow:
            raise LowbitError(f"--device {opts.device} --compute-dtype {opts.compute_dtype}: {', '.join(slow)} "
                              "trains on the CPU in float32 only for now (compile with --device cpu --compute-dtype "
                              "float32)")
    if opts.stream:
        if opts.head != "float":
            raise LowbitError("--stream does not compress the head yet (--head needs the whole model's activations)")
        if hasattr(method, "after_calibration") and getattr(method, "e2e", True):
            raise LowbitError(f"--stream: {opts.method}'s end-to-end phase trains the whole model at once; "
                              "it needs the model in memory (compile without --stream, or --phases block-ap)")
    tag = method.config.tag() if hasattr(method.config, "tag") else opts.method
    if opts.preset is not None:
        tag += f"-{opts.preset['name']}"
    if opts.overrides is not None:
        tag += "-overrides"
    if opts.head != "float":
        tag += f"-head{opts.head}"
    out = Path(opts.output) if opts.output else default_output(opts, tag)
    src = models.resolve(opts.model)
    check_output(out, opts.overwrite, protect=[src.path], need_bytes=_artifact_estimate(src.path))
    ckpt_dir = out.with_name(out.name + ".ckpt")
    if hasattr(method, "checkpoint_dir"):  # training methods checkpoint beside the output
        if ckpt_dir.exists() and not opts.resume and not opts.overwrite:
            raise LowbitError(f"{ckpt_dir} holds checkpoints of an earlier run: pass --resume to continue it or "
                              "--overwrite to restart")
        if opts.resume and run.world.enabled:
            raise LowbitError("--resume under torchrun is not supported (the ranks could stop at different blocks): "
                              "resume in one process, or restart with --overwrite")
        # under torchrun rank 0 alone checkpoints (every rank ends each block with the same formats)
        method.checkpoint_dir, method.resume = (ckpt_dir if run.world.writer else None), opts.resume
    elif opts.resume:
        raise LowbitError(f"--resume applies to methods with per-block checkpoints (efficientqat, reallm); "
                          f"{opts.method} has none")
    float_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": None}.get(opts.float_dtype, "bad")
    if float_dtype == "bad":
        raise LowbitError(f"--float-dtype must be float16, bfloat16 or float32, got {opts.float_dtype!r}")
    data.load_text(opts.calib, "calib")
    for e in opts.eval:
        data.load_text(e, "eval")
    if opts.eval_windows is not None and opts.eval_windows < 1:
        raise LowbitError("--eval-windows must be >= 1")
    run.method, run.plan, run.tag, run.out, run.ckpt_dir, run.float_dtype = method, plan, tag, out, ckpt_dir, float_dtype
    run.source_path = src.path


def _artifact_estimate(path: Path) -> int:
    """Bytes the artifact may take: the input's size, times 1.5 because a quantized GGUF input (Q4_1) comes out
    with fp16 embeddings and norms (SmolLM2: 98 MB in, 117 MB out); an fp16/fp32 input comes out smaller."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return int(1.5 * sum(p.stat().st_size for p in files))


def _load_model(run: _Run) -> None:
    opts, method, plan = run.opts, run.method, run.plan
    if not opts.progress:  # -q: transformers' own progress bars too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    with run.timer.stage("load"):
        run.say(f"[load] {opts.model}" + (" (streaming: block weights read in turn)" if opts.stream else ""))
        if opts.stream:
            from lowbit.compiler.engine import stream

            run.model, run.tokenizer, src, run.streamer = stream.load(opts.model, spill_parent=run.out.parent,
                                                                          output_name=run.out.name)
        else:
            run.model, run.tokenizer, src = models.load(opts.model)
    if plan is not None:
        plan.precheck(n for n, m in run.model.named_modules() if models.is_linear_like(m))
    float_params = {id(p): p for p in run.model.parameters()}
    run.n_params = sum(p.numel() for p in float_params.values())
    run.report = {
        "lowbit_version": __version__,
        "model": {"id": src.model_id, "source": str(src.path), "kind": src.kind, "class": type(run.model).__name__,
                  "params": run.n_params},
        "method": {**method.describe(), "tag": run.tag, **({"preset": opts.preset} if opts.preset else {}),
                   **({"overrides": [r.describe() for r in plan.rules]} if plan is not None else {})},
        "eval": {},
    }


def _evaluate_float(run: _Run) -> None:
    opts, model = run.opts, run.model
    if not run.world.writer:
        return
    for e in opts.eval:
        run.eval_tokens[e] = data.eval_tokens(run.tokenizer, e)
        if opts.eval_float and opts.stream:
            run.say(f"[eval] {e}: float perplexity skipped (--stream never holds the float model)")
        elif opts.eval_float:
            with run.timer.stage("eval float"):
                r = perplexity(lambda ids: model(input_ids=ids, use_cache=False).logits, run.eval_tokens[e][0],
                               opts.eval_seqlen, opts.eval_windows, label=f"eval {e} float", progress=opts.progress)
            run.report["eval"][e] = {"data": run.eval_tokens[e][1], "before": r}
            run.say(f"[eval] {e} float perplexity {r['ppl']:.3f} over {r['windows']} windows")


def _calibrate(run: _Run) -> None:
    opts, method, plan = run.opts, run.method, run.plan
    with run.timer.stage("data"):
        run.windows, run.calib_info = data.calibration_windows(run.tokenizer, opts.calib, opts.nsamples, opts.seqlen,
                                                               opts.seed)
    if run.world.enabled:
        run.calib_info["world_size"] = run.world.size
        run.say(f"[calibrate] torchrun: {run.world.size} processes, {run.windows.shape[0]} windows, "
                f"{-(-run.windows.shape[0] // run.world.size)} or fewer each; Hessians summed over all")
    run.report["calibration"] = run.calib_info
    windows = run.world.shard(run.windows)
    needs_data = plan.needs_data if plan is not None else method.needs_data
    if needs_data:  # where the activations live, decided (and a disk checked) before calibration starts
        from lowbit.compiler.engine.activations import ActivationStore

        cfg = run.model.config
        hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or 0
        chains = 2 if getattr(method, "needs_float_stream", False) else 1
        itemsize = torch.empty(0, dtype=run.placement.dtype).element_size()
        need = windows.shape[0] * windows.shape[1] * hidden * itemsize * chains
        run.store = ActivationStore.choose(opts.activations, run.placement, need, opts.offload_dir, run.out.parent,
                                           log=run.say)
    if opts.preset is not None:
        p = opts.preset
        run.say(f"[preset] {p['name']}: {p['source']}; " + (
            "your flags override " + ", ".join(f"{k} ({v['paper']} -> {v['used']})" for k, v in
                                               p["overridden_by_user"].items()) + "; " if p["overridden_by_user"] else "")
                + f"{len(p['deviations'])} deviations (report.json: method.preset)")
    with run.timer.stage("calibrate"):
        run.say(f"[calibrate] {opts.method} {run.tag} on {run.windows.shape[0]} x {run.windows.shape[1]} tokens of "
                f"{run.calib_info['source']}")
        try:
            run.cal = Engine(run.model, method, windows if needs_data else None,
                             progress=opts.progress and run.world.writer, plan=plan, stream=run.streamer,
                             world=run.world, placement=run.placement, store=run.store).run()
        except ValueError as e:  # a method's training refusal (NaN loss, mismatched checkpoint)
            raise LowbitError(str(e)) from e
    # End-to-end phases over the whole quantized model: under torchrun on rank 0 alone, over all the windows (the
    # other ranks are done once the blocks are; the phase's gradients are not summed over ranks)
    if hasattr(method, "after_calibration") and run.world.writer:
        with run.timer.stage(f"{opts.method} end-to-end"):
            try:
                run.cal.results = method.after_calibration(run.model, run.cal.results, run.windows, opts.progress)
            except ValueError as e:
                raise LowbitError(str(e)) from e


def _rewrite_graph(run: _Run) -> None:
    """Capture the (quantized-chain) model, rewrite its linears into lowbit ops, and lower it to a program."""
    cal = run.cal
    with run.timer.stage("export"):
        ep = capture.capture(run.model)
        gm = ep.module()
    with run.timer.stage("passes"):
        # verification runs the float and the rewritten model: not with --stream (no float model in memory)
        run.ctx = PassContext(results=cal.results, float_weights=cal.float_weights,
                              calib_batch=None if run.streamer is not None else run.windows[:1])
        try:
            run.pass_reports = PassManager([*default_passes(), *run.opts.extra_passes], log=run.say).run(gm, run.ctx)
        except PassError as e:  # nothing has been written yet
            raise LowbitError(str(e)) from e
        del ep
    with run.timer.stage("lower"):
        run.program = capture.recapture(gm)
        if run.streamer is not None:  # the graph records its tensors as they will be loaded, not as placeholders
            run.streamer.contiguous_metadata(run.program)


def _write_artifact(run: _Run) -> None:
    opts, cal, ctx, method, timer, say = run.opts, run.cal, run.ctx, run.method, run.timer, run.say
    report, out, tag = run.report, run.out, run.tag
    layers = {}
    for name, fmt in cal.results.items():
        layers[name] = {**fmt.meta(), "nbytes": fmt.nbytes(), "bits_per_weight": fmt.bits_per_weight(),
                        **ctx.metrics.get(name, {}), **cal.info.get(name, {})}
    comp_params = sum(f.in_features * f.out_features for f in cal.results.values())
    comp_bytes = sum(f.nbytes() for f in cal.results.values())
    manifest_extra = {
        "model": report["model"],
        "method": report["method"],
        "calibration": run.calib_info,
        "versions": {"lowbit": __version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__, "python": platform.python_version()},
        "float_storage_dtype": opts.float_dtype,
        "calibration_run": {**run.placement.describe(), "world_size": run.world.size,
                            "streamed": run.streamer is not None},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    attrs = {m: v["attrs"] for m, v in ctx.replaced.items()}
    try:
        with art.staging_dir(out, overwrite=opts.overwrite, protect=[run.source_path]) as tmp:
            with timer.stage("save"):
                st = run.streamer
                art.write(tmp, run.program, cal.results, attrs, manifest_extra, float_dtype=run.float_dtype,
                          sources=st.sources(run.program) if st is not None else None,
                          byte_source=st.spill.origin if st is not None else None)
                run.tokenizer.save_pretrained(str(tmp / "tokenizer"))
                # The architecture, so that lowerings can rebuild graphs the program does not hold
                # (the ONNX decoder with a key/value cache).
                run.model.config.save_pretrained(str(tmp / "model_config"))
                # what ships is what we evaluate (streaming: only when asked, the load holds the packed model)
                loaded = art.load(tmp) if st is None or opts.eval else None
            packed_file = (tmp / art.PACKED_FILE).stat().st_size
            artifact_bytes = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
            for e in opts.eval:
                with timer.stage("eval quantized"):
                    r = perplexity(loaded, run.eval_tokens[e][0], opts.eval_seqlen, opts.eval_windows,
                                   label=f"eval {e} {opts.method}", progress=opts.progress)
                report["eval"].setdefault(e, {"data": run.eval_tokens[e][1]})["after"] = r
                say(f"[eval] {e} {opts.method} {tag} perplexity {r['ppl']:.3f}")
            report.update({
                "calibration": run.calib_info,
                "passes": [r.to_json() for r in run.pass_reports],
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
                    "float_fp16_bytes": 2 * run.n_params,
                    "float_fp32_bytes": 4 * run.n_params,
                    "artifact_bytes": artifact_bytes,
                    "output": str(out),
                },
            })
            if opts.target == "onnx":
                from lowbit.compiler.lowering.onnx_artifact import export_artifact

                with timer.stage("onnx"):
                    report["onnx"] = export_artifact(tmp, accuracy_level=opts.onnx_accuracy_level, progress=say)
            if opts.target == "mlir":
                from lowbit.compiler.lowering import mlir

                with timer.stage("mlir"):
                    report["mlir"] = mlir.export_artifact(tmp, progress=say)
            if getattr(method, "e2e_report", None):
                report["end_to_end"] = method.e2e_report
            report["times"] = {**timer.times, "total": time.perf_counter() - run.t_all}
            report["resources"] = {"peak_rss_mib": peak_rss_mib(),
                                   "block_seconds": [round(t, 3) for t in getattr(cal, "block_times", [])],
                                   **run.placement.peak_memory()}
            report_mod.write(report, tmp)
    except FileExistsError as e:
        raise LowbitError(str(e)) from e
    report["summary"]["output"] = str(out)
    if hasattr(method, "checkpoint_dir"):  # the artifact is complete: the checkpoints have served
        shutil.rmtree(run.ckpt_dir, ignore_errors=True)


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
    res = report.get("resources", {})
    if res.get("peak_rss_mib"):
        lines.append(f"  peak memory        : {res['peak_rss_mib'] / 1024:.2f} GiB resident (this process's VmHWM)"
                     + (f", {res['device_peak_mib'] / 1024:.2f} GiB on the GPU" if res.get("device_peak_mib") else ""))
    return "\n".join(lines)

