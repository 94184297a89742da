"""``apiq``: ApiQ (Liao et al., 2024) -- quantized base and LoRA initialized together to preserve activations.

For every decoder block in order, with two activation streams (float chain and quantized chain):

* ``mode="bw"`` (block-wise, default; the official code's only variant): every linear of the block is
  replaced by fake quantization with learnable weight clipping (LWC) plus LoRA; the clipping logits
  and the LoRA factors are trained jointly with AdamW (two parameter groups: LWC lr 5e-3, LoRA lr 5e-4,
  weight decay 0.1, no schedule) to minimize ``MSE(float block(float inputs), block(quantized inputs))``
  (``aug_loss`` adds ``MSE(float block(quantized inputs), ...)``); one window per step, ``epochs``
  passes over the windows.
* ``mode="lw"`` (layer-wise, paper v1): the same objective per linear, ``X W^T`` (float inputs) vs
  ``Xq (Q + B A)^T`` (inputs from the already-quantized preceding linears), linears in forward order.

Then the clipping is frozen into ``AffineIntK`` codes/scales/zeros and the LoRA factors are stored in
fp16 as the format's low-rank branch (``B`` with the LoRA scaling ``alpha / r`` folded in). Bits per
weight count them as stored.

Baseline initializations under the same flags (``init``): ``qlora`` (round-to-nearest base, ``B = 0``;
data-free) and ``loftq`` (LoftQ's alternating quantize / SVD, data-free). Paper hyper-parameters are
the defaults (r = 64, alpha = 16, 20 epochs); rank, alpha, target modules, epochs and learning rates are
options.
"""

from __future__ import annotations

import fnmatch
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.runtime.modules import swap_module

from .base import Method, UniformConfig, register
from .base import progress as _log  # rank 0 alone prints under torchrun
from .data_parallel import WindowShard
from .lora import LWCQuantizer, QuantLoRALinear, kaiming_lora, loftq_init


@dataclass
class ApiQConfig(UniformConfig):
    bits: int = 2
    group_size: int = 64
    mode: str = "bw"  # bw | lw
    init: str = "apiq"  # apiq | qlora | loftq
    rank: int = 64
    alpha: float = 16.0
    targets: str = "*"  # comma-separated fnmatch patterns on a linear's name inside its block
    epochs: int = 20
    lr_lwc: float = 5e-3
    lr_lora: float = 5e-4
    weight_decay: float = 0.1
    aug_loss: bool = False
    batch_size: int = 1
    loftq_iters: int = 5
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        if not 2 <= self.bits <= 8:
            raise ValueError(f"apiq quantizes to 2-8 bits, got --bits {self.bits}")
        if self.mode not in ("bw", "lw"):
            raise ValueError(f"--apiq-mode must be bw or lw, got {self.mode!r}")
        if self.init not in ("apiq", "qlora", "loftq"):
            raise ValueError(f"--lora-init must be apiq, qlora or loftq, got {self.init!r}")
        if self.rank < 0:
            raise ValueError(f"--lora-rank must be >= 0, got {self.rank}")
        if self.epochs < 0 or self.batch_size < 1 or self.loftq_iters < 1:
            raise ValueError("--apiq-epochs must be >= 0, --apiq-batch-size and --loftq-iters >= 1")
        if not self.targets.strip():
            raise ValueError("--lora-targets must name at least one pattern ('*' = every linear)")

    def tag(self) -> str:
        kind = {"apiq": f"apiq-{self.mode}", "qlora": "qlora", "loftq": "loftq"}[self.init]
        return f"w{self.bits}g{self.group_size}" + ("sym" if self.symmetric else "") + f"-r{self.rank}-{kind}"


@register
class ApiQ(Method):
    name = "apiq"
    Config = ApiQConfig

    def __init__(self, config):
        super().__init__(config)
        # The baselines are data-free; ApiQ trains against the float chain.
        self.needs_data = config.init == "apiq"
        self.needs_float_stream = config.init == "apiq"
        self._gen = torch.Generator().manual_seed(config.seed)

    def _targeted(self, rel: str) -> bool:
        pats = [p.strip() for p in self.config.targets.split(",") if p.strip()]
        short = rel.rsplit(".", 1)[-1]
        return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(short, p) for p in pats)

    def _rank_for(self, rel: str) -> int:
        return self.config.rank if self._targeted(rel) else 0

    def _stand_in(self, ctx, name: str, mod: nn.Module) -> QuantLoRALinear:
        c = self.config
        w = ctx.weight_of(mod).float()
        n, k = w.shape
        r = self._rank_for(name[len(ctx.prefix) + 1:])
        a, b = kaiming_lora(r, n, k, self._gen) if r else (None, None)
        q = LWCQuantizer(n, k, c.bits, c.group_size, c.symmetric)
        return QuantLoRALinear(w, getattr(mod, "bias", None), q, a, b, c.alpha / r if r else 0.0)

    # -- data-free baselines -------------------------------------------------------------------------
    def _baseline(self, ctx) -> dict:
        c = self.config
        out = {}
        for name, mod in ctx.linears.items():
            w = ctx.weight_of(mod).float()
            r = self._rank_for(name[len(ctx.prefix) + 1:])
            if c.init == "loftq" and r:
                fmt = loftq_init(w, r, c.bits, c.group_size, c.symmetric, c.loftq_iters)
            else:  # QLoRA: round-to-nearest base, A random, B = 0 (the branch starts at zero)
                from lowbit.runtime.formats import LowRank

                from .quant import rtn_quantize

                fmt = rtn_quantize(w, c.bits, c.group_size, c.symmetric)
                if r:
                    a, b = kaiming_lora(r, *w.shape, self._gen)
                    fmt.lowrank = LowRank(a.half(), b.half())
            err = float(((fmt.dequantize() - w) ** 2).sum() / (w**2).sum().clamp(min=1e-30))
            ctx.set_weight(mod, fmt.dequantize())
            if hasattr(ctx, "record"):
                ctx.record(name, {"rank": r, "weight_rel_error": err})
            out[name] = fmt
        return out

    # -- training ----------------------------------------------------------------------------------
    @staticmethod
    def _trainable(stand_ins) -> list:
        return [p for s in stand_ins.values() for p in s.parameters()]

    def _optimizer(self, stand_ins) -> torch.optim.Optimizer:
        c = self.config
        lwc = [p for s in stand_ins for p in s.quantizer.parameters()]
        lora = [p for s in stand_ins for p in (s.lora_a, s.lora_b) if p is not None]
        groups = [{"params": lwc, "lr": c.lr_lwc, "weight_decay": c.weight_decay}]
        if lora:
            groups.append({"params": lora, "lr": c.lr_lora, "weight_decay": c.weight_decay})
        return torch.optim.AdamW(groups)

    def _train(self, forward, inputs, targets, targets2, params_of, label: str, shard: WindowShard):
        """AdamW over ``epochs`` passes of the windows; returns (first-epoch loss, last-epoch loss). Batches are
        of one-process window indices (``shard``: under torchrun each rank computes its windows' part)."""
        c = self.config
        opt = self._optimizer(params_of)
        n = shard.n
        first = last = float("nan")
        t0 = time.perf_counter()

        def loss_of(mine):
            x = torch.cat([inputs[j] for j in mine])
            out = forward(x)
            loss = torch.nn.functional.mse_loss(out, torch.cat([targets[j] for j in mine]))
            if targets2 is not None:
                loss = loss + torch.nn.functional.mse_loss(out, torch.cat([targets2[j] for j in mine]))
            return loss

        for epoch in range(c.epochs):
            total = 0.0
            for i in range(0, n, c.batch_size):
                idx = range(i, min(i + c.batch_size, n))
                opt.zero_grad(set_to_none=True)
                value = shard.backward(shard.batch_loss(idx, loss_of), opt)
                if not math.isfinite(value):
                    raise ValueError(f"{label}: training loss became {value} at epoch {epoch + 1}")
                opt.step()
                total += value * len(idx)
            total /= n
            first = total if epoch == 0 else first
            last = total
        if c.epochs:
            _log(f"[apiq] {label}: loss {first:.3e} -> {last:.3e} over {c.epochs} epochs "
                 f"({time.perf_counter() - t0:.1f}s)")
        return first, last

    @torch.no_grad()
    def _loss(self, forward, inputs, targets, shard: WindowShard) -> float:
        return shard.mean(range(shard.n), lambda j: float(torch.nn.functional.mse_loss(forward(inputs[j]), targets[j])))

    def _blockwise(self, ctx) -> dict:
        block, engine = ctx.block, ctx.engine
        targets2 = ctx.run_block(ctx.quant_inputs) if self.config.aug_loss else None  # float block, quantized inputs
        stand_ins, originals = {}, {}
        for name, mod in ctx.linears.items():
            stand_ins[name] = self._stand_in(ctx, name, mod)
        for name, s in stand_ins.items():
            originals[name] = swap_module(block, name[len(ctx.prefix) + 1:], s)
        # Only the clipping logits and LoRA factors train; the block's own parameters (norms) stay fixed.
        frozen = [p for p in block.parameters() if p.requires_grad and not any(p is q for q in self._trainable(stand_ins))]
        for p in frozen:
            p.requires_grad_(False)
        try:
            def forward(x):
                return engine.call_block(block, x)

            # (No separate before/after passes: on SmolLM2 each costs a third of an epoch. The first and last
            # epochs' mean losses are recorded instead.)
            with torch.enable_grad():
                first, last = self._train(forward, ctx.quant_inputs, ctx.float_targets, targets2,
                                          list(stand_ins.values()), ctx.prefix, WindowShard(ctx))
        finally:
            for name, mod in originals.items():
                swap_module(block, name[len(ctx.prefix) + 1:], mod)
            for p in frozen:
                p.requires_grad_(True)
        out = {}
        for name, s in stand_ins.items():
            fmt = s.freeze()
            ctx.set_weight(ctx.linears[name], fmt.dequantize())
            ctx.record(name, {"rank": fmt.lowrank.rank if fmt.lowrank else 0, "block_mse_first_epoch": first,
                              "block_mse_last_epoch": last})
            out[name] = fmt
        return out

    def _capture_inputs(self, ctx, inputs, names) -> dict:
        """Inputs of the named linears when the block runs on ``inputs`` (one tensor list per linear)."""
        got = {n: [] for n in names}
        hooks = [ctx.linears[n].register_forward_hook(lambda m, a, o, n=n: got[n].append(a[0].detach()))
                 for n in names]
        try:
            ctx.run_block(inputs)
        finally:
            for h in hooks:
                h.remove()
        return got

    def _layerwise(self, ctx) -> dict:
        names = list(ctx.linears)
        floats = self._capture_inputs(ctx, ctx.float_inputs, names)  # float weights everywhere still
        # Linears fed by the same tensor (q/k/v, gate/up) are one stage: quantizing one does not change the
        # others' inputs, so the quantized-chain inputs are re-captured only when a stage ends.
        shared = {n: id(floats[n][0]) for n in names}
        out, quant = {}, None
        shard = WindowShard(ctx)
        for i, name in enumerate(names):
            mod = ctx.linears[name]
            if quant is None or shared[name] != shared[names[i - 1]]:
                quant = self._capture_inputs(ctx, ctx.quant_inputs, [name])[name]
            w = ctx.weight_of(mod).float()
            bias = getattr(mod, "bias", None)
            targets = [torch.nn.functional.linear(x, w, None if bias is None else bias.float()) for x in floats[name]]
            s = self._stand_in(ctx, name, mod)
            before = self._loss(s, quant, targets, shard)
            with torch.enable_grad():
                self._train(s, quant, targets, None, [s], name, shard)
            after = self._loss(s, quant, targets, shard)
            fmt = s.freeze()
            ctx.set_weight(mod, fmt.dequantize())
            ctx.record(name, {"rank": fmt.lowrank.rank if fmt.lowrank else 0, "layer_mse_init": before,
                              "layer_mse_trained": after})
            out[name] = fmt
            floats[name] = None
        return out

    def calibrate_block(self, ctx) -> dict:
        if self.config.init != "apiq":
            return self._baseline(ctx)
        try:
            return self._blockwise(ctx) if self.config.mode == "bw" else self._layerwise(ctx)
        except ValueError as e:
            raise ValueError(f"apiq, block {ctx.prefix}: {e}") from e
