"""``lowbit-finetune``: train the LoRA branches, the group scales, or every continuous tensor of a compiled
artifact; the packed codes stay frozen and packed.

The model is rebuilt from the artifact (``model_config/`` + its float tensors); every compressed uniform linear
becomes a :class:`PackedTrainLinear` whose base is the ``lowbit::affine_linear`` op on the artifact's packed
tensors (differentiable with respect to its input and its scales, never densified into a parameter). What
trains (``--train``): ``lora`` -- the LoRA factors, float32 parameters initialized from the artifact's fp16
``lora_a``/``lora_b`` (ApiQ's fine-tuning); ``scales`` -- the fp16 group scales, float32 masters rounded back
to fp16 when stored, codes and zero points frozen (EfficientQAT's E2E-QP); ``all`` -- every continuous
tensor the uniform and VQ layers store: group scales, VQ codebooks (ReALLM) and low-rank factors (the scales at
``--lr-quant``, the codebooks at ``--lr``, neither with weight decay) -- the continuous half of PV-tuning.
``--distill`` replaces the next-token loss by the KL divergence to the float model's next-token distribution
(the model the manifest names, loaded again). ``--device cuda`` trains on a GPU; the artifact is the same kind.

Training (:func:`train_loop`, shared with ``--method efficientqat``'s E2E-QP phase): next-token loss on
windows of ``--data`` (C4 by default: documents 0-999), AdamW, 3% warm-up, cosine decay, a fixed window
order drawn from ``--seed``. A checkpoint (trained tensors, optimizer and schedule state, step) is written
atomically every ``--checkpoint-every`` steps into ``OUTPUT.ckpt/``; ``--resume`` continues from it and
reaches the same result as an uninterrupted run. The new artifact is written (staged, then renamed) only
when training ends; a NaN/Inf loss stops training with an error and writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lowbit.compiler.engine.rebuild import rewrite_program
from lowbit.errors import LowbitError
from lowbit.runtime.output_dir import check_output
from lowbit.passes.methods.training import LoopSettings, attach, train_loop

CKPT_FILE = "finetune.pt"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class FinetuneOptions:
    artifact: str
    output: str
    train: str = "lora"  # lora | scales | all
    data: str = "c4"
    nsamples: int = 256
    seqlen: int = 512
    val_samples: int = 8
    epochs: int = 1
    batch_size: int = 4
    lr: float | None = None  # None: lora 3e-4 (ApiQ); scales 2e-5 at 2 bits, else 1e-5 (EfficientQAT)
    weight_decay: float | None = None  # None: lora 0.1; scales 0
    grad_clip: float | None = None  # max gradient norm; None: lora none, scales 0.3 (EfficientQAT)
    lr_quant: float | None = None  # --train all: the group scales' lr (None: 2e-5 at 2 bits, else 1e-5)
    distill: bool = False  # loss: KL to the float model's next-token distribution instead of cross-entropy
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    warmup: float = 0.03
    seed: int = 0
    checkpoint_every: int = 16
    resume: bool = False
    overwrite: bool = False
    stop_after: int | None = None  # train at most this many steps in this run, checkpoint, and stop
    eval: tuple = ()
    eval_windows: int | None = None
    eval_seqlen: int = 2048
    progress: bool = True

    def training_key(self) -> dict:
        """What must match for a checkpoint to be resumed (everything that changes the result)."""
        keep = ("train", "data", "nsamples", "seqlen", "val_samples", "epochs", "batch_size", "lr", "weight_decay", "warmup",
                "seed", "grad_clip", "lr_quant", "distill")
        return {k: v for k, v in asdict(self).items() if k in keep}


def _source_key(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()


def finetune(opts: FinetuneOptions) -> dict:
    """Train, then write the new artifact at ``opts.output``. Returns the fine-tuning report.

    With ``stop_after`` the run stops after that many steps (checkpoint written, no artifact) and the
    report has ``"stopped": True``."""
    from lowbit.compiler.engine import data
    from lowbit.compiler.engine.rebuild import rebuild_model
    from lowbit.runtime import artifact as art
    from lowbit.runtime.artifact import ArtifactError

    say = _log if opts.progress else (lambda m: None)
    out = Path(opts.output)
    check_output(out, opts.overwrite, protect=[opts.artifact])
    ckpt_dir = out.with_name(out.name + ".ckpt")
    ckpt = ckpt_dir / CKPT_FILE
    if ckpt.exists() and not opts.resume and not opts.overwrite:
        raise LowbitError(f"{ckpt} exists from an earlier run: pass --resume to continue it or --overwrite to restart")
    for name, v in (("--epochs", opts.epochs), ("--batch-size", opts.batch_size), ("--nsamples", opts.nsamples),
                    ("--checkpoint-every", opts.checkpoint_every)):
        if v < 1:
            raise LowbitError(f"{name} must be >= 1, got {v}")
    from lowbit.compiler.engine.device import resolve_device

    device = resolve_device(opts.device)  # a GPU that is not there is refused before anything loads
    try:
        source = art.load(opts.artifact)
    except ArtifactError as e:
        raise LowbitError(str(e)) from e
    low = min((f.bits for f in source.formats.values() if hasattr(f, "bits")), default=4)
    scales_lr = 2e-5 if low <= 2 else 1e-5  # EfficientQAT's E2E-QP
    if opts.lr is None:
        opts.lr = scales_lr if opts.train == "scales" else 3e-4
    if opts.train == "all" and opts.lr_quant is None:
        opts.lr_quant = scales_lr
    if opts.lr_quant is not None and opts.train != "all":
        raise LowbitError("--lr-quant applies to --train all (the group scales' lr beside the other tensors')")
    if opts.weight_decay is None:
        opts.weight_decay = 0.0 if opts.train == "scales" else 0.1
    if opts.grad_clip is None and opts.train in ("scales", "all"):
        opts.grad_clip = 0.3
    for name, v in (("--lr", opts.lr), ("--lr-quant", opts.lr_quant)):
        if v is not None and not v > 0:
            raise LowbitError(f"{name} must be > 0, got {v}")

    data.load_text(opts.data, "calib")  # refuses evaluation-only text (wikitext2)

    t_start = time.perf_counter()
    torch.manual_seed(opts.seed)
    model = rebuild_model(source)
    for p in model.parameters():
        p.requires_grad_(False)
    modules = attach(model, source.formats, opts.train)
    teacher = _teacher(source) if opts.distill else None
    model.to(device)
    if teacher is not None:
        teacher.to(device)

    tok = source.tokenizer
    windows, info = data.calibration_windows(tok, opts.data, opts.nsamples + opts.val_samples, opts.seqlen, opts.seed)
    train, val = windows[: opts.nsamples], windows[opts.nsamples:]
    key = {"training": opts.training_key(), "source": _source_key(source.manifest)}
    cfg = LoopSettings(opts.epochs, opts.batch_size, opts.lr, opts.weight_decay, opts.warmup, opts.seed,
                       opts.checkpoint_every, grad_clip=opts.grad_clip, stop_after=opts.stop_after,
                       lr_quant=opts.lr_quant, device=device)
    what = {"lora": "low-rank factors", "scales": "group scales",
            "all": "group scales, codebooks and low-rank factors"}[opts.train]
    say(f"[finetune] training the {what} of {source.path} on {info['source']} ({device}"
        + (", distilled from the float model)" if teacher is not None else ")"))
    res = train_loop(model, modules, train, val, cfg, ckpt, key, opts.resume, say, teacher=teacher)
    del teacher
    train_time = time.perf_counter() - t_start
    if res["stopped"]:
        return {"stopped": True, "step": res["step"], "total_steps": res["steps"], "checkpoint": str(ckpt)}

    formats = dict(source.formats)
    for name, m in modules.items():
        formats[name] = m.trained_format()
    report = {"source": str(opts.artifact), "options": opts.training_key(), "steps": res["steps"],
              "trainable_params": res["trainable_params"], "time_s": train_time,
              # the loop's time over every run of a resumed training (a GPU run finished on the CPU, say)
              "train_s": res["train_s"], "devices": res["devices"], "history": res["history"],
              "data": info, "eval": {}}
    try:
        source_eval = json.loads((Path(source.path) / "report.json").read_text()).get("eval", {})
    except (OSError, json.JSONDecodeError):
        source_eval = {}

    def evaluate(loaded) -> None:  # on the staged artifact: what ships is what is evaluated
        from lowbit.compiler.engine.evaluate import perplexity

        for e in opts.eval:
            tokens, _ = data.eval_tokens(tok, e)
            r = perplexity(loaded, tokens, opts.eval_seqlen, opts.eval_windows, label=f"eval {e} fine-tuned",
                           progress=opts.progress)
            before = source_eval.get(e, {}).get("after")
            report["eval"][e] = {"before": before, "after": r}
            b = f"{before['ppl']:.3f} ({before['windows']} windows) -> " if before else ""
            say(f"[eval] {e} perplexity {b}{r['ppl']:.3f} ({r['windows']} windows) after fine-tuning")

    _write_artifact(source, formats, out, report, opts.overwrite, evaluate)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    say(f"[finetune] wrote {out} ({train_time:.0f}s of training, {time.perf_counter() - t_start:.0f}s in all)")
    return report


def _teacher(source):
    """The float model the artifact was compiled from: its manifest's model alias (``smollm2-135m``: the installed
    package's file, wherever it is on this machine), else the path it recorded."""
    from lowbit.compiler.engine import models

    m = source.manifest.get("model", {})
    errors = []
    for spec in (m.get("id") if m.get("id") in models.ALIASES else None, m.get("source")):
        if not spec:
            continue
        try:
            return models.load(spec)[0]
        except LowbitError as e:
            errors.append(f"{spec}: {e}")
    raise LowbitError(f"--distill needs the float model {source.path} was compiled from, and it cannot be loaded ("
                      + ("; ".join(errors) or "the manifest names no model") + ")")


def _write_artifact(source, formats: dict, out: Path, report: dict, overwrite: bool, evaluate) -> None:
    """Capture the float architecture again and rewrite it with the trained formats (same passes as compile)."""
    from lowbit.compiler.engine.rebuild import rebuild_model
    from lowbit.runtime import artifact as art

    program, attrs = rewrite_program(rebuild_model(source), formats)
    extra = {k: v for k, v in source.manifest.items() if k not in ("lowbit_manifest", "modules", "tensors", "files")}
    extra["finetune"] = {k: report[k] for k in ("source", "options", "steps", "trainable_params")}
    extra["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(source.manifest.get("float_storage_dtype"))
    with art.staging_dir(out, overwrite=overwrite, protect=[source.path]) as tmp:
        art.write(tmp, program, formats, attrs, extra, float_dtype=dtype)
        for sub in ("tokenizer", "model_config"):
            if (Path(source.path) / sub).is_dir():
                shutil.copytree(Path(source.path) / sub, tmp / sub)
        evaluate(art.load(tmp))
        (tmp / "finetune.json").write_text(json.dumps(report, indent=1))  # a log beside the manifest, like report.json
