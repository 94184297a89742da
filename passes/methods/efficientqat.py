"""``efficientqat``: EfficientQAT (Chen et al., 2024) -- Block-AP, then E2E-QP; uniform asymmetric packed weights.

**Block-AP** (phase ``block-ap``), for every decoder block in order, with two activation streams (float
chain and quantized chain): each linear becomes a :class:`BlockAPLinear` whose weight ``W``, group scales
``s`` and zero points ``z`` are all trainable, with fake quantization
``Ŵ = (clamp(round(W / s) + round(z), 0, 2^b - 1) - round(z)) · s`` and straight-through rounding (LSQ+-style);
``init`` chooses the start: ``gptq`` (default) runs GPTQ (act-order, static groups) on the block's linears
first and starts from its codes (``W`` = GPTQ's dequantized weight, ``s``/``z`` its group parameters), so
the fake-quantized block equals the GPTQ block at step 0; ``minmax`` is the paper's start (``W`` the float
weight, ``s``/``z`` the group's min-max). Why GPTQ: on SmolLM2 the min-max start leaves block 11 (where the
massive "attention sink" activations are created by ``mlp.down_proj``) with an error that the short
training cannot remove and every later block then inherits; GPTQ's Hessian-weighted start does not. The block is trained with AdamW (weight decay 0; ``s``/``z`` at
lr 1e-4 from min-max and 1e-5 from GPTQ, ``W`` at 2e-5 for 2 bits and 1e-5 otherwise, each group cosine-annealed to lr/20) to minimize
``MSE(float block(float inputs), block(quantized inputs))``, ``batch_size`` windows per step, ``epochs`` passes,
a few held-out windows for a validation loss at the start and per epoch; the parameters with the lowest
validation loss are kept (training never returns a block worse on held-out windows than its start). Then ``s`` is rounded to fp16 and the codes are
chosen for it: what is stored is what was trained.

**E2E-QP** (phase ``e2e-qp``, :meth:`EfficientQAT.after_calibration`): the packed model (codes and zero
points frozen and packed, ``lowbit::affine_linear`` differentiable w.r.t. the scales) trains only the fp16
group scales on next-token loss over the calibration windows (AdamW, weight decay 0, lr 2e-5 at 2 bits /
1e-5 otherwise, 3% warm-up then cosine, gradient norm clipped at 0.3), through the same loop as
``lowbit-finetune --train scales``. Without ``block-ap`` the codes are the min-max round-to-nearest ones
(the paper's "E2E-QP only" ablation).

Checkpoints (when the pipeline sets ``checkpoint_dir``; ``OUTPUT.ckpt/``): every finished block
(``block-<i>.pt``), the block in training every ``checkpoint_every`` steps (``block-current.pt``) and the
E2E-QP phase every ``checkpoint_every`` steps (``e2e.pt``). With ``resume`` a run replays the finished
blocks, continues the interrupted one from its last step and gives the same artifact as an uninterrupted
run: every random choice derives from ``seed`` and the block index.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lowbit.runtime.checkpoint_io import load_checkpoint
from lowbit.runtime.modules import swap_module

from .base import Method, UniformConfig, register
from .base import progress as _log  # rank 0 alone prints under torchrun
from .checkpoints import BlockCheckpoints, save_atomic
from .data_parallel import WindowShard

PHASES = ("block-ap", "e2e-qp")


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _clamp_ste(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return x + (x.clamp(lo, hi) - x).detach()


def _after_step(label: str, step: int) -> None:
    """Called after every Block-AP optimizer step (tests interrupt runs here)."""


@dataclass
class EfficientQATConfig(UniformConfig):
    bits: int = 2
    group_size: int = 64
    phases: str = "block-ap,e2e-qp"
    epochs: int = 2  # Block-AP passes over the windows
    batch_size: int = 2
    lr_quant: float | None = None  # s, z; None: 1e-4 from min-max (the paper's), 1e-5 from GPTQ
    lr_weight: float | None = None  # W; None: 2e-5 at 2 bits, else 1e-5
    min_lr_factor: float = 20.0
    val_windows: int = 8  # held out of the calibration windows for the validation losses
    e2e_epochs: int = 1
    e2e_batch_size: int = 4
    e2e_lr: float | None = None  # None: 2e-5 at 2 bits, else 1e-5
    e2e_grad_clip: float = 0.3
    checkpoint_every: int = 16
    seed: int = 0
    init: str = "gptq"  # Block-AP start: "gptq" (codes of GPTQ act-order) or "minmax" (the paper's)

    def phase_list(self) -> list:
        return [p.strip() for p in self.phases.split(",") if p.strip()]

    def validate(self) -> None:
        super().validate()
        if not 2 <= self.bits <= 8:
            raise ValueError(f"efficientqat quantizes to 2-8 bits, got --bits {self.bits}")
        if self.symmetric:
            raise ValueError("efficientqat is asymmetric (trained integer zero points); drop --sym")
        ph = self.phase_list()
        bad = [p for p in ph if p not in PHASES]
        if bad or not ph or len(set(ph)) != len(ph):
            raise ValueError(f"--phases must be a comma-separated subset of {','.join(PHASES)}, got {self.phases!r}")
        if self.epochs < 0 or self.batch_size < 1 or self.e2e_epochs < 1 or self.e2e_batch_size < 1:
            raise ValueError("--eqat-epochs must be >= 0; batch sizes and --eqat-e2e-epochs >= 1")
        if self.init not in ("gptq", "minmax"):
            raise ValueError(f"--eqat-init must be gptq or minmax, got {self.init!r}")
        if self.val_windows < 0 or self.checkpoint_every < 1:
            raise ValueError("--eqat-val-windows must be >= 0 and --checkpoint-every >= 1")
        for name in ("lr_quant", "lr_weight", "e2e_lr"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be > 0, got {v}")

    def quant_lr(self) -> float:
        # From GPTQ's codes the paper's 1e-4 makes SmolLM2's block losses worse in the first epoch (block 0
        # at w3g128: 0.0753 -> 0.0891 held-out MSE); 1e-5 keeps or improves them.
        return self.lr_quant if self.lr_quant is not None else (1e-5 if self.init == "gptq" else 1e-4)

    def weight_lr(self) -> float:
        return self.lr_weight if self.lr_weight is not None else (2e-5 if self.bits == 2 else 1e-5)

    def scales_lr(self) -> float:
        return self.e2e_lr if self.e2e_lr is not None else (2e-5 if self.bits == 2 else 1e-5)

    def tag(self) -> str:
        ph = self.phase_list()
        suffix = "" if ph == list(PHASES) else "-" + "-".join(p.replace("-", "") for p in ph)
        return f"w{self.bits}g{self.group_size}{suffix}"


class BlockAPLinear(nn.Module):
    """Block-AP stand-in for one linear: trainable ``W``, group scales ``s`` and zero points ``z``."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None, bits: int, group_size: int, start=None):
        """``start``: an ``AffineIntK`` to start from (``W`` = its dequantized weight, ``s``/``z`` its group
        parameters, so the codes at step 0 are its codes); None: ``W`` = ``w`` and min-max ``s``/``z``."""
        super().__init__()
        n, k = w.shape
        self.n, self.k, self.bits, self.group_size = n, k, bits, group_size
        self.groups = math.ceil(k / group_size)
        self.maxq = (1 << bits) - 1
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        if start is not None:
            scale, zero = start.scales.float().clone(), start.zero_points().float().clone()
            self.weight = nn.Parameter(start.dequantize().float().clone())
            self.scale = nn.Parameter(scale)
            self.zero = nn.Parameter(zero)
            return
        self.weight = nn.Parameter(w.detach().float().clone())
        wg = self._grouped(self.weight.detach())
        wmin, wmax = wg.amin(-1), wg.amax(-1)
        scale = ((wmax - wmin) / self.maxq).clamp(1e-4, 1e4)
        self.scale = nn.Parameter(scale)
        self.zero = nn.Parameter(torch.round(-wmin / scale).clamp(0, self.maxq))

    def _grouped(self, w: torch.Tensor) -> torch.Tensor:
        pad = self.groups * self.group_size - self.k
        if pad:  # the ragged last group is padded by repeating its last column: its range is unchanged
            w = torch.cat([w, w[:, -1:].expand(-1, pad)], 1)
        return w.reshape(self.n, self.groups, self.group_size)

    def fake_weight(self) -> torch.Tensor:
        s = _clamp_ste(self.scale, 1e-4, 1e4)[..., None]
        z = _clamp_ste(_round_ste(self.zero), 0, self.maxq)[..., None]
        q = torch.clamp(_round_ste(self._grouped(self.weight) / s) + z, 0, self.maxq)
        return ((q - z) * s).reshape(self.n, -1)[:, : self.k]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.fake_weight(), self.bias)

    @torch.no_grad()
    def freeze(self):
        """The packed format: fp16 scales first, then the codes for them (what is stored is what trained)."""
        from lowbit.runtime.formats import AffineIntK

        s = self.scale.clamp(1e-4, 1e4).half().float()
        z = torch.round(self.zero).clamp(0, self.maxq)
        q = torch.clamp(torch.round(self._grouped(self.weight) / s[..., None]) + z[..., None], 0, self.maxq)
        codes = q.reshape(self.n, -1)[:, : self.k]
        return AffineIntK.from_codes(codes.to(torch.uint8), s, z.to(torch.uint8), self.bits, self.group_size)


@register
class EfficientQAT(BlockCheckpoints, Method):
    name = "efficientqat"
    Config = EfficientQATConfig

    def __init__(self, config):
        super().__init__(config)
        self.block_ap = "block-ap" in config.phase_list()
        self.e2e = "e2e-qp" in config.phase_list()
        self.needs_data = self.block_ap
        self.needs_float_stream = self.block_ap
        self.phase_times = {"block-ap": 0.0, "e2e-qp": 0.0}

    # -- Block-AP --------------------------------------------------------------------------------------
    def _rtn(self, ctx) -> dict:
        out = {}
        for name, mod in ctx.linears.items():
            fmt = BlockAPLinear(ctx.weight_of(mod).float(), None, self.config.bits, self.config.group_size).freeze()
            ctx.set_weight(mod, fmt.dequantize())
            out[name] = fmt
        return out

    def calibrate_block(self, ctx) -> dict:
        if not self.block_ap:
            return self._rtn(ctx)
        t0 = time.perf_counter()
        try:
            self.check_key(ctx)
            return self._block_ap(ctx)
        except ValueError as e:
            raise ValueError(f"efficientqat, block {ctx.prefix}: {e}") from e
        finally:
            self.phase_times["block-ap"] += time.perf_counter() - t0

    def _block_ap(self, ctx) -> dict:
        c = self.config
        restored = self.restore_block(ctx)  # a finished block of an interrupted run
        if restored is not None:
            return restored

        block, engine = ctx.block, ctx.engine
        starts = self._gptq_starts(ctx) if c.init == "gptq" else {}
        stand_ins = {name: BlockAPLinear(ctx.weight_of(mod).float(), getattr(mod, "bias", None), c.bits,
                                         c.group_size, starts.get(name)) for name, mod in ctx.linears.items()}
        originals = {name: swap_module(block, name[len(ctx.prefix) + 1:], s) for name, s in stand_ins.items()}
        own = {id(p) for s in stand_ins.values() for p in s.parameters()}
        frozen = [p for p in block.parameters() if p.requires_grad and id(p) not in own]
        for p in frozen:
            p.requires_grad_(False)
        try:
            with torch.enable_grad():
                info = self._train_block(ctx, stand_ins, lambda x: engine.call_block(block, x))
        finally:
            for name, mod in originals.items():
                swap_module(block, name[len(ctx.prefix) + 1:], mod)
            for p in frozen:
                p.requires_grad_(True)
        out = {}
        for name, s in stand_ins.items():
            out[name] = s.freeze()
            ctx.set_weight(ctx.linears[name], out[name].dequantize())
            ctx.record(name, info)
        self.save_block(ctx, out, {n: info for n in out})
        cur = self.ckpt_path("block-current.pt")
        if cur is not None and cur.exists():
            cur.unlink()
        return out

    def _gptq_starts(self, ctx) -> dict:
        """GPTQ (act-order, static groups: contiguous groups, the stored layout) on each linear of the block,
        all from the block's quantized-chain inputs; the Block-AP start."""
        from .base import take_hessian
        from .gptq import GPTQConfig, gptq_quantize

        c = self.config
        cfg = GPTQConfig(bits=c.bits, group_size=c.group_size, symmetric=False, act_order=True)
        hs = ctx.hessians(list(ctx.linears))
        out = {}
        for name, mod in ctx.linears.items():
            try:
                out[name], _ = gptq_quantize(ctx.weight_of(mod), take_hessian(hs, name), cfg)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from e
        return out

    def _train_block(self, ctx, stand_ins: dict, forward) -> dict:
        c = self.config
        shard = WindowShard(ctx)  # torchrun: this rank's windows of the one-process list (data_parallel.py)
        n_all = shard.n
        n_val = min(c.val_windows, n_all // 4)
        n_train = n_all - n_val
        steps_per_epoch = math.ceil(n_train / c.batch_size)
        total = steps_per_epoch * c.epochs
        quant = [p for s in stand_ins.values() for p in (s.scale, s.zero)]
        weights = [s.weight for s in stand_ins.values()]
        opt = torch.optim.AdamW([{"params": quant, "lr": c.quant_lr()}, {"params": weights, "lr": c.weight_lr()}],
                                weight_decay=0.0)
        floor = 1.0 / c.min_lr_factor

        def cosine(step):  # lr -> lr / min_lr_factor over the whole block's training
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, [cosine, cosine])
        named = {f"{n}.{k}": p for n, s in stand_ins.items() for k, p in s.named_parameters()}
        step, history = 0, []
        best = {"val_loss": float("inf"), "step": 0, "params": None}  # params None: the current ones
        cur = self.ckpt_path("block-current.pt")
        if self.resume and cur is not None and cur.exists():
            state = load_checkpoint(cur)
            if state["block"] == ctx.index:
                for k, p in named.items():
                    p.data.copy_(state["params"][k])
                opt.load_state_dict(state["optimizer"])
                sched.load_state_dict(state["scheduler"])
                step, history = state["step"], json.loads(state["history"])
                best = state["best"]
                _log(f"[efficientqat] {ctx.prefix}: resumed at step {step}/{total}")

        def val_loss() -> float:
            if not n_val:
                return float("nan")
            with torch.no_grad():
                return shard.mean(range(n_train, n_all), lambda j: float(torch.nn.functional.mse_loss(
                    forward(ctx.quant_inputs[j]), ctx.float_targets[j])))

        def keep_if_best(val: float, at: int) -> None:
            if val < best["val_loss"]:  # NaN (no validation windows) never replaces: the last step is kept
                best.update(val_loss=val, step=at, params={k: p.detach().clone() for k, p in named.items()})

        t0 = time.perf_counter()
        if step == 0 and total:
            v0 = val_loss()
            history.append({"epoch": 0, "val_loss": v0})
            keep_if_best(v0, 0)
            _log(f"[efficientqat] {ctx.prefix} start ({c.init}): validation loss {v0:.3e}")
        epoch_loss = 0.0
        while step < total:
            epoch, i = divmod(step, steps_per_epoch)
            order = torch.randperm(n_train, generator=torch.Generator().manual_seed(
                c.seed * 1_000_003 + ctx.index * 1009 + epoch))
            idx = order[i * c.batch_size : (i + 1) * c.batch_size].tolist()
            opt.zero_grad(set_to_none=True)
            value = shard.backward(shard.batch_loss(idx, lambda mine: torch.nn.functional.mse_loss(
                forward(torch.cat([ctx.quant_inputs[j] for j in mine])),
                torch.cat([ctx.float_targets[j] for j in mine]))), opt)
            if not math.isfinite(value):
                raise ValueError(f"Block-AP loss became {value} at step {step + 1}; "
                                 "no artifact written (try a lower --eqat-lr-weight/--eqat-lr-quant)")
            opt.step()
            sched.step()
            step += 1
            epoch_loss += value * len(idx)
            if step % steps_per_epoch == 0 or step == total:
                rec = {"epoch": epoch + 1, "train_loss": epoch_loss / n_train, "val_loss": val_loss()}
                history.append(rec)
                keep_if_best(rec["val_loss"], step)
                epoch_loss = 0.0
                _log(f"[efficientqat] {ctx.prefix} epoch {rec['epoch']}/{c.epochs}: train loss "
                     f"{rec['train_loss']:.3e}, validation loss {rec['val_loss']:.3e} ({time.perf_counter() - t0:.0f}s)")
            if cur is not None and step % c.checkpoint_every == 0 and step < total:
                save_atomic(cur, {"block": ctx.index, "step": step, "history": json.dumps(history), "best": best,
                            "params": {k: p.detach().clone() for k, p in named.items()},
                            "optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
            _after_step(ctx.prefix, step)
        # (Training resumed mid-epoch restarts that epoch's loss sum: the logged train loss of that
        # epoch then covers only the steps run since; the weights are unaffected.)
        if best["params"] is not None and best["step"] != total:
            with torch.no_grad():
                for k, p in named.items():
                    p.copy_(best["params"][k])
            _log(f"[efficientqat] {ctx.prefix}: kept the parameters of step {best['step']} "
                 f"(validation loss {best['val_loss']:.3e})")
        return {"block_ap_steps": total, "block_ap_history": history, "block_ap_kept_step": best["step"],
                "block_ap_init": self.config.init}

    # -- E2E-QP ------------------------------------------------------------------------------------------
    def after_calibration(self, model: nn.Module, results: dict, windows: torch.Tensor, progress: bool = True) -> dict:
        """E2E-QP: train the fp16 scales of the packed model end to end; returns the updated formats."""
        if not self.e2e:
            return results
        from .training import LoopSettings, attach, train_loop

        c = self.config
        t0 = time.perf_counter()
        say = _log if progress else (lambda m: None)
        originals = {name: model.get_submodule(name) for name in results}
        flags = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        modules = attach(model, results, "scales")
        n_val = min(c.val_windows, len(windows) // 4)
        train, val = windows[: len(windows) - n_val], windows[len(windows) - n_val:]
        cfg = LoopSettings(c.e2e_epochs, c.e2e_batch_size, c.scales_lr(), 0.0, 0.03, c.seed, c.checkpoint_every,
                           grad_clip=c.e2e_grad_clip, label="e2e-qp")
        ckpt = self.ckpt_path("e2e.pt")  # None: no checkpoints (library use without an output directory)
        key = {"config": asdict(c), "formats": hashlib.sha256(b"".join(
            f.qweight.numpy().tobytes() + f.scales.numpy().tobytes() for f in results.values())).hexdigest()}
        try:
            res = train_loop(model, modules, train, val, cfg, ckpt, key, self.resume, say)
        finally:
            for name, mod in originals.items():
                swap_module(model, name, mod)
            for p, f in flags.items():
                p.requires_grad_(f)
        out = dict(results)
        for name, m in modules.items():
            out[name] = m.trained_format()
        self.e2e_report = {"steps": res["steps"], "history": res["history"], "trainable_params": res["trainable_params"]}
        self.phase_times["e2e-qp"] += time.perf_counter() - t0
        return out
