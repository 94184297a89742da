"""The training loop shared by ``--method efficientqat``'s E2E-QP phase and ``lowbit-finetune``.

* :func:`attach`: swap the trainable compressed linears of a rebuilt model for :class:`PackedTrainLinear`
  (uniform: LoRA factors and/or fp16 group scales train, codes frozen and packed) or
  :class:`PackedVQLoRALinear` (ReALLM: the low-rank factors train); every other compressed linear becomes a
  :class:`~lowbit.runtime.modules.PackedLinear` running its op, so the model computes what the artifact does.
* :func:`train_loop`: next-token training of those tensors (AdamW, warm-up then cosine decay, fixed window
  order from the seed, validation loss, atomic checkpoints every ``checkpoint_every`` steps, exact resume).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.runtime import ops as _ops  # noqa: F401  (registers torch.ops.lowbit.*)
from lowbit.runtime.checkpoint_io import CheckpointError, load_checkpoint
from lowbit.runtime.modules import PackedLinear, swap_module


def _low_rank_tensors(module: nn.Module, lowrank, train: bool) -> None:
    """``module.lora_a`` / ``lora_b``: float32 parameters initialized from the format's fp16 factors when they
    train; else the stored factors as buffers (None without a branch), a frozen branch the forward still applies."""
    if train:
        module.lora_a = nn.Parameter(lowrank.lora_a.float().clone())
        module.lora_b = nn.Parameter(lowrank.lora_b.float().clone())
    else:
        module.register_buffer("lora_a", None if lowrank is None else lowrank.lora_a)
        module.register_buffer("lora_b", None if lowrank is None else lowrank.lora_b)


class PackedTrainLinear(nn.Module):
    """``affine_linear(x, packed base) (+ (x A^T) B^T)``: the codes frozen; ``A``/``B`` and/or the scales trainable."""

    def __init__(self, fmt, bias: torch.Tensor | None, lora: bool = True, scales: bool = False):
        super().__init__()
        if lora and fmt.lowrank is None:
            raise ValueError("no LoRA branch")
        self.fmt = fmt
        self.train_lora, self.train_scales = lora, scales
        self.register_buffer("qweight", fmt.qweight)
        self.register_buffer("zeros", fmt.zeros)
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        if scales:  # float32 master copy; stored back as fp16
            self.scales = nn.Parameter(fmt.scales.float().clone())
        else:
            self.register_buffer("scales", fmt.scales)
        _low_rank_tensors(self, fmt.lowrank, lora)

    def forward(self, x):
        f = self.fmt
        if self.train_lora:
            y = torch.ops.lowbit.affine_linear(x, self.qweight, self.scales, self.zeros, self.bias, None, None,
                                               f.bits, f.group_size, f.in_features)
            return y + nn.functional.linear(nn.functional.linear(x, self.lora_a), self.lora_b)
        return torch.ops.lowbit.affine_linear(x, self.qweight, self.scales, self.zeros, self.bias, self.lora_a,
                                              self.lora_b, f.bits, f.group_size, f.in_features)

    def trainable(self) -> dict:
        out = {"scales": self.scales} if self.train_scales else {}
        if self.train_lora:
            out.update({"a": self.lora_a, "b": self.lora_b})
        return out

    def trained_format(self):
        new = {}
        if self.train_scales:
            new["scales"] = self.scales.detach().cpu().half().contiguous()
        if self.train_lora:
            new["lora_a"] = self.lora_a.detach().cpu().half().contiguous()
            new["lora_b"] = self.lora_b.detach().cpu().half().contiguous()
        return type(self.fmt).from_tensors(self.fmt.meta(), {**self.fmt.tensors(), **new})


PackedLoRALinear = PackedTrainLinear  # the name of the LoRA-only version


class PackedVQLoRALinear(nn.Module):
    """A ReALLM (:class:`~lowbit.runtime.formats.VQCodebook`) linear in training: the codes and the
    permutation frozen; the low-rank factors ``A``/``B`` trainable (``lora``) and, with ``quant``, the codebook
    and the fp16 group scales too (float32 masters, stored back as fp16: the continuous half of PV-tuning).

    With ``quant`` off the base is the ``lowbit::vq_linear`` op; with it on the weight is rebuilt from the
    trainable codebook and scales on every call (the readable dequantization of :func:`dequantize_vq`, written with
    differentiable indexing), so their gradients flow; the indices are unpacked once and kept as int32."""

    def __init__(self, fmt, bias: torch.Tensor | None, lora: bool = True, quant: bool = False):
        super().__init__()
        if lora and fmt.lowrank is None:
            raise ValueError("no low-rank part")
        self.fmt, self.train_lora, self.train_quant = fmt, lora, quant
        self.train_scales = quant
        for name in ("perm",) if quant else ("codes", "perm"):  # trained: the unpacked index replaces the codes
            self.register_buffer(name, getattr(fmt, name))
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        if quant:
            self.codebook = nn.Parameter(fmt.codebook.float().clone())
            self.scales = nn.Parameter(fmt.scales.float().clone())
            k = fmt.in_features
            self.register_buffer("index", fmt.indices().to(torch.int32), persistent=False)
            self.register_buffer("col_group", (torch.arange(k) // fmt.group_size).to(torch.int32), persistent=False)
            self.register_buffer("inv_perm", None if fmt.perm is None else torch.argsort(fmt.perm.long()).to(torch.int32),
                                 persistent=False)
        else:
            self.register_buffer("codebook", fmt.codebook)
            self.register_buffer("scales", fmt.scales)
        _low_rank_tensors(self, fmt.lowrank, lora)

    def _weight(self) -> torch.Tensor:
        n, k = self.fmt.out_features, self.fmt.in_features
        wp = self.codebook[self.index].reshape(n, k) * self.scales[:, self.col_group]  # stored column order
        return wp if self.inv_perm is None else wp[:, self.inv_perm]

    def forward(self, x):
        f = self.fmt
        if self.train_quant:
            y = nn.functional.linear(x, self._weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        else:
            y = torch.ops.lowbit.vq_linear(x, self.codes, self.codebook, self.scales, self.perm, self.bias, None, None,
                                           f.index_bits, f.vec_dim, f.group_size, f.in_features)
        if self.lora_a is None:
            return y
        return y + nn.functional.linear(nn.functional.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))

    def trainable(self) -> dict:
        out = {"codebook": self.codebook, "scales": self.scales} if self.train_quant else {}
        if self.train_lora:
            out.update({"a": self.lora_a, "b": self.lora_b})
        return out

    def trained_format(self):
        new = {k: p.detach().cpu().half().contiguous() for k, p in (("codebook", self.codebook), ("scales", self.scales))
               if self.train_quant}
        if self.train_lora:
            new["lora_a"] = self.lora_a.detach().cpu().half().contiguous()
            new["lora_b"] = self.lora_b.detach().cpu().half().contiguous()
        return type(self.fmt).from_tensors(self.fmt.meta(), {**self.fmt.tensors(), **new})


# A compressed linear that does not train is packed_model's PackedLinear (its lowbit op over the packed format);
# the old name stays for callers.
PackedFrozenLinear = PackedLinear


TRAIN_CHOICES = ("lora", "scales", "all")


def attach(model: nn.Module, formats: dict, train: str = "lora") -> dict:
    """Swap the trainable compressed linears for :class:`PackedTrainLinear`; returns ``{name: module}``.

    ``train="lora"``: the uniform and VQ (ReALLM) linears with a low-rank branch; ``"scales"``: every uniform
    linear; ``"all"``: every uniform and VQ linear, each with every continuous tensor it stores (group scales, VQ
    codebooks, low-rank factors; the codes stay frozen). Every other compressed linear (no low-rank part, BiLLM's
    binary residual, VQ under ``scales``) becomes a :class:`~lowbit.compiler.engine.packed_model.PackedLinear`
    running its op: the model must compute what the artifact computes."""
    from lowbit.runtime.formats import AffineIntK, VQCodebook

    if train not in TRAIN_CHOICES:
        raise LowbitError(f"--train must be one of {', '.join(TRAIN_CHOICES)}, got {train!r}")
    out = {}
    for name, fmt in formats.items():
        if train == "lora" and not isinstance(fmt, (AffineIntK, VQCodebook)):
            raise LowbitError(f"{name}: {fmt.kind} layers cannot be fine-tuned (only uniform or VQ layers "
                              "with a low-rank branch)")
        bias = getattr(model.get_submodule(name), "bias", None)
        if ((train == "lora" and fmt.lowrank is None) or (train == "scales" and not isinstance(fmt, AffineIntK))
                or (train == "all" and not isinstance(fmt, (AffineIntK, VQCodebook)))):
            swap_module(model, name, PackedLinear(fmt, bias))
            continue
        lora = fmt.lowrank is not None and train in ("lora", "all")
        if isinstance(fmt, VQCodebook):
            out[name] = PackedVQLoRALinear(fmt, bias, lora=lora, quant=train == "all")
        else:
            out[name] = PackedTrainLinear(fmt, bias, lora=lora, scales=train in ("scales", "all"))
        swap_module(model, name, out[name])
    if not out:
        if train == "all":
            raise LowbitError("the artifact has no uniform or VQ layer to train (BiLLM's binary layers cannot be)")
        if train == "lora":
            raise LowbitError("the artifact has no LoRA branch to train: compile it with --method apiq "
                              "(any --lora-init) and --lora-rank > 0, or --method reallm with ranks > 0")
        raise LowbitError("the artifact has no uniform (AffineIntK) layer whose scales could train")
    return out


_attach = attach


def _schedule(step: int, total: int, warmup: float) -> float:
    w = max(1, int(round(warmup * total)))
    if step < w:
        return (step + 1) / w
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - w) / max(1, total - w))))


def _save_ckpt(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: an interruption leaves the previous checkpoint intact


@dataclass
class LoopSettings:
    """What :func:`train_loop` needs (a subset of :class:`FinetuneOptions`)."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup: float
    seed: int
    checkpoint_every: int
    grad_clip: float | None = None
    stop_after: int | None = None
    label: str = "finetune"
    lr_quant: float | None = None  # group scales at this lr, codebooks at lr, neither decayed (None: one group)
    device: torch.device | None = None  # where the model is (the windows go there)


def training_bytes(model: nn.Module, modules: dict, batch: int, seqlen: int) -> int:
    """A rough upper estimate of what one training step adds to the loaded model: activations kept for the
    backward pass (per token and layer about 12 hidden-sized and 4 intermediate-sized float32 vectors; attention
    through SDPA keeps no probabilities), the logits with their log-softmax and gradient, the largest trained
    linear's dequantized weight and its gradient (the packed ops rebuild it), and AdamW's two states per trained
    value."""
    cfg = model.config
    hidden = getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0)
    inter = getattr(cfg, "intermediate_size", None) or 4 * hidden
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 1)
    vocab = getattr(cfg, "vocab_size", 0)
    tokens = batch * seqlen
    acts = 4 * tokens * layers * (12 * hidden + 4 * inter)
    logits = 4 * tokens * vocab * 3
    biggest = max((m.fmt.out_features * m.fmt.in_features for m in modules.values()), default=0)
    trained = sum(p.numel() for m in modules.values() for p in m.trainable().values())
    return acts + logits + 4 * 2 * biggest + 4 * 3 * trained


HEADROOM = 0.6  # the share of the available memory a micro-batch's estimate may take


def micro_batch(model: nn.Module, modules: dict, batch: int, seqlen: int, label: str, extra_per_window: int = 0) -> int:
    """The most windows of a step that fit in the memory available now: ``batch`` where it fits, else the step's
    windows go through in micro-batches of that many, their gradients accumulated (the same step, up to float
    summation order). Refuses (rather than swap or be killed) when not even one window fits. ``extra_per_window``:
    bytes a window needs beyond :func:`training_bytes` (a teacher's logits)."""
    from lowbit.runtime import resources

    have = resources.available_bytes()

    def need(m: int) -> int:
        return training_bytes(model, modules, m, seqlen) + extra_per_window * m

    # the estimate is rough (an E2E-QP step of 16 windows that it put at 19 GiB was killed at 23 GiB): a batch is cut
    # until it needs at most HEADROOM of what is available; one window is still tried up to all of it
    m = batch
    while m > 1 and need(m) > HEADROOM * have:
        m = (m + 1) // 2
    if need(m) > have:
        raise LowbitError(f"{label}: one training window needs about {need(1) / 2**30:.1f} GiB beyond the loaded "
                          f"model, {have / 2**30:.1f} GiB is available: lower --seqlen (or skip the phase)")
    return m


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``KL(teacher || student)`` of the next-token distributions, averaged over tokens (temperature 1)."""
    t = torch.log_softmax(teacher_logits.float(), -1)
    s = torch.log_softmax(student_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean()


def train_loop(model: nn.Module, modules: dict, train: torch.Tensor, val: torch.Tensor, cfg: LoopSettings,
               ckpt: Path | None, key: dict, resume: bool, say, teacher: nn.Module | None = None) -> dict:
    """Next-token training of the trainable tensors of ``modules`` (``{name: PackedTrainLinear}``).

    ``teacher``: the loss is :func:`distill_loss` against its logits instead of the next-token cross-entropy
    (knowledge distillation from the float model); the validation loss stays the student's cross-entropy.

    AdamW (one group; with ``lr_quant``: low-rank factors at ``lr`` with ``weight_decay``, codebooks at ``lr``
    without, group scales at ``lr_quant`` without), ``warmup`` fraction of linear warm-up then cosine decay to 0, window order
    ``randperm(seed + epoch)``; validation loss on ``val`` at step 0, every ``checkpoint_every`` steps
    and at the end; checkpoint (atomic) every ``checkpoint_every`` steps unless ``ckpt`` is None. A checkpoint
    written on a GPU resumes on the CPU (and back). Returns ``{"history", "steps", "stopped", "step",
    "trainable_params", "train_s", "devices"}``: ``train_s`` is the time in the loop over every run of a resumed
    training, ``devices`` where those runs trained; raises :class:`LowbitError` on a NaN/Inf loss."""
    named = {f"{n}.{k}": p for n, m in modules.items() for k, p in m.trainable().items()}
    dev = cfg.device or torch.device("cpu")
    params = list(named.values())
    micro = min(cfg.batch_size, len(train))
    if cfg.device is None or cfg.device.type == "cpu":
        micro = micro_batch(model, modules, micro, train.shape[1], cfg.label,
                            extra_per_window=0 if teacher is None else 12 * train.shape[1]
                            * getattr(model.config, "vocab_size", 0))  # the teacher's logits, log-softmax, probabilities
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    if cfg.lr_quant is None:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:  # group scales are small numbers (a weight's RMS): their own lr; codebook entries are O(1), like factors
        kind = {k: k.rsplit(".", 1)[-1] for k in named}
        groups = [{"params": [p for k, p in named.items() if kind[k] not in ("scales", "codebook")]},
                  {"params": [p for k, p in named.items() if kind[k] == "codebook"], "weight_decay": 0.0},
                  {"params": [p for k, p in named.items() if kind[k] == "scales"], "lr": cfg.lr_quant,
                   "weight_decay": 0.0}]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, total, cfg.warmup))
    key_s = json.dumps(key, sort_keys=True)
    step, history = 0, []
    earlier_s, devices = 0.0, []  # training time and devices of the runs before a resume
    tag = f"[{cfg.label}]"
    if resume and ckpt is not None and ckpt.exists():
        try:
            state = load_checkpoint(ckpt)
        except CheckpointError as e:
            raise LowbitError(str(e)) from None
        if state["key"] != key_s:
            raise LowbitError(f"{ckpt} was written for another artifact or other training options; "
                              "use the same options, or --overwrite to restart")
        for k, p in named.items():
            p.data.copy_(state["params"][k])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, history = state["step"], json.loads(state["history"])
        earlier_s = float(state.get("train_s", 0.0))  # absent in checkpoints of older lowbit versions
        devices = json.loads(state.get("devices", "[]"))
        say(f"{tag} resumed from {ckpt} at step {step}/{total}")
    elif resume:
        say(f"{tag} no checkpoint at {ckpt}; starting from the beginning")

    def val_loss() -> float:
        if not len(val):
            return float("nan")
        with torch.no_grad():
            return float(sum(model(input_ids=v[None].to(dev), labels=v[None].to(dev), use_cache=False).loss
                             for v in val) / len(val))

    here = str(dev) if dev.type != "cuda" else f"cuda ({torch.cuda.get_device_name(dev)})"

    def run_devices() -> list:
        return devices if devices[-1:] == [here] else devices + [here]

    def checkpoint():
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        _save_ckpt(ckpt, {"key": key_s, "step": step, "history": json.dumps(history),
                          "train_s": earlier_s + time.perf_counter() - t0, "devices": json.dumps(run_devices()),
                          "params": {k: p.detach().clone() for k, p in named.items()},
                          "optimizer": opt.state_dict(), "scheduler": sched.state_dict()})

    n_train = sum(p.numel() for p in params)
    say(f"{tag} {len(modules)} layers, {n_train:,} trainable parameters; {len(train)} windows x "
        f"{train.shape[1]} tokens, batch {cfg.batch_size}, {total} steps"
        + (f" (each in micro-batches of {micro} windows, gradients accumulated: the memory available holds no more)"
           if micro < min(cfg.batch_size, len(train)) else ""))
    if step == 0:
        v0 = val_loss()
        history.append({"step": 0, "val_loss": v0})
        say(f"{tag} step 0/{total}: validation loss {v0:.4f}")
    model.train()
    ran, t0, stopped = 0, time.perf_counter(), False
    try:
        while step < total:
            if cfg.stop_after is not None and ran >= cfg.stop_after:
                stopped = True
                break
            epoch, i = divmod(step, steps_per_epoch)
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed + epoch))
            batch = train[order[i * cfg.batch_size : (i + 1) * cfg.batch_size]].to(dev)
            opt.zero_grad(set_to_none=True)
            loss = torch.zeros((), device=dev)
            for part in batch.split(micro):  # one part unless the step's windows do not fit in memory at once
                if teacher is None:
                    part_loss = model(input_ids=part, labels=part, use_cache=False).loss
                else:
                    with torch.no_grad():
                        target = teacher(input_ids=part, use_cache=False).logits
                    part_loss = distill_loss(model(input_ids=part, use_cache=False).logits, target)
                    del target
                # both losses are means over the part's tokens: weighted by its share, the sum is the batch's mean
                part_loss = part_loss * (len(part) / len(batch))
                if not torch.isfinite(part_loss):
                    raise LowbitError(f"training loss became {float(part_loss.detach())} at step {step + 1}; no "
                                      "artifact written (last good checkpoint: "
                                      f"{ckpt if ckpt is not None and ckpt.exists() else 'none'})")
                part_loss.backward()
                loss = loss + part_loss.detach()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            ran += 1
            rec = {"step": step, "loss": float(loss.detach()), "lr": sched.get_last_lr()[0]}
            if step % cfg.checkpoint_every == 0 or step == total:
                model.eval()
                rec["val_loss"] = val_loss()
                model.train()
            history.append(rec)
            rate = ran * batch.numel() / (time.perf_counter() - t0)
            eta = (total - step) * batch.numel() / max(rate, 1e-9)
            say(f"{tag} step {step}/{total}: loss {rec['loss']:.4f}, lr {rec['lr']:.2e}"
                + (f", validation loss {rec['val_loss']:.4f}" if "val_loss" in rec else "")
                + f" ({rate:.0f} tokens/s, ETA {eta:.0f}s)")
            if ckpt is not None and step % cfg.checkpoint_every == 0:
                checkpoint()
    finally:
        model.eval()
    if stopped and ckpt is not None:
        checkpoint()
        say(f"{tag} stopped after {ran} steps at step {step}/{total}; checkpoint {ckpt} (continue with --resume)")
    return {"history": history, "steps": total, "step": step, "stopped": stopped, "trainable_params": n_train,
            "train_s": earlier_s + time.perf_counter() - t0, "devices": run_devices()}
