"""The block-sequential calibration engine, shared by every method.

1. The inputs of block 0 are captured once for every calibration window (a pre-hook records the
   block's arguments and stops the forward).
2. For block ``i``: the method calibrates the block's linears (``method.calibrate_block(ctx)``), leaving
   their weights at the quantized values; then the quantized block runs on its inputs and its outputs
   become the inputs of block ``i+1`` (the *quantized chain*, as in GPTQ).
3. Methods that train against the float model set ``needs_float_stream``; the engine then also keeps
   the float chain (``ctx.float_inputs`` -> ``ctx.float_targets``).

Memory is one block's work plus the activation cache (``nsamples x seqlen x hidden`` per stream). The
original float weights of every compressed linear are kept aside (``Calibration.float_weights``) and
restored into the model at the end, so the exported graph starts from float and verification can
compare against it. With a streamer (``--stream``, :mod:`lowbit.compiler.engine.stream`) each block's
weights are read before its turn and replaced by placeholders after it, and no float copy is kept.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.compiler.engine.activations import ActivationStore, DiskList
from lowbit.compiler.engine.device import Placement
from lowbit.compiler.engine.models import find_blocks, is_linear_like, linear_weight, set_linear_weight
from lowbit.errors import LowbitError


class _Captured(Exception):
    pass


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Calibration:
    """What the engine produced: formats, original float weights and per-linear diagnostics."""

    results: dict = field(default_factory=dict)  # module name -> format
    float_weights: dict = field(default_factory=dict)  # module name -> (out, in) float weight
    info: dict = field(default_factory=dict)  # module name -> method diagnostics
    block_times: list = field(default_factory=list)


# Inputs up to which Hessians are accumulated in float64 (SmolLM2's: 19 MB at most); above, float32 (a 7B's
# would take 134 MB each for q/k/v and 970 MB for down_proj), where a torchrun sum then differs from one
# process's by float32 rounding.
WIDE_HESSIAN = 2048


def all_finite(t: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """No NaN/Inf in ``t``, checked a slice at a time (``torch.isfinite`` of a 7B down_proj Hessian in one piece
    takes ~850 MB of temporaries)."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def _dump_hessians(prefix: str, hs: dict, world) -> None:
    """Diagnostics: with ``LOWBIT_DUMP_HESSIANS=DIR`` each block's Hessians (after the torchrun sum) go to
    ``DIR/<block>.safetensors`` (rank 0), so runs can be compared (``benchmarks/distributed_check.py``)."""
    import os

    d = os.environ.get("LOWBIT_DUMP_HESSIANS")
    if not d or (world is not None and not world.writer):
        return
    from safetensors.torch import save_file

    os.makedirs(d, exist_ok=True)
    save_file({n: h.contiguous() for n, h in hs.items()}, os.path.join(d, f"{prefix}.safetensors"))


def _all_finite(tensors) -> bool:
    """No NaN/Inf in an activation list (a disk list knows it from its writes: no second read)."""
    if isinstance(tensors, DiskList):
        return tensors.all_finite
    return all(bool(torch.isfinite(x).all()) for x in tensors)


class BlockContext:
    """Handed to ``Method.calibrate_block``: the block, its linears and the cached activations."""

    def __init__(self, engine: "Engine", index: int, block: nn.Module, prefix: str):
        self.engine = engine
        self.index = index
        self.block = block
        self.prefix = prefix
        self.linears = {f"{prefix}.{n}": m for n, m in block.named_modules() if is_linear_like(m)}
        self.quant_inputs = engine.quant_inputs
        self.float_inputs = engine.float_inputs
        self.float_targets = None
        self.kwargs = engine.kwargs

    weight_of = staticmethod(linear_weight)
    set_weight = staticmethod(set_linear_weight)

    def run_block(self, inputs):
        return self.engine.run_block(self.block, inputs)

    def hessians(self, names) -> dict:
        """``{name: 2/n * sum x x^T}`` over the quantized-chain inputs (float32, ``(in, in)``).

        Linears that read the very same input tensor (q/k/v, gate/up) share one Hessian: it is accumulated once
        and the same tensor is returned under each name (methods clone before modifying). For a 7B block that
        is 3 Hessians of 4096^2 + one of 11008^2 instead of 7, and 3 fewer products per window."""
        if self.quant_inputs is None:
            raise RuntimeError("this method was declared data-free but asked for Hessians")
        hs, counts, hooks = {}, {}, []
        live: dict = {}  # this block call's inputs: (data_ptr, shape, stride) -> the first linear that read it
        leader: dict = {}  # name -> the linear whose Hessian it shares (itself if none), fixed at the first call

        def block_call(m, args, kwargs):
            live.clear()

        for name in names:
            mod = self.linears[name]
            k = linear_weight(mod).shape[1]
            counts[name] = 0

            def hook(m, args, out, name=name, k=k):
                x = args[0]
                # the entry holds x alive for the rest of the block call, so no later input reuses its address
                first = live.setdefault((x.data_ptr(), tuple(x.shape), tuple(x.stride())), (name, x))[0]
                if leader.setdefault(name, first) != first:
                    raise LowbitError(f"{name}: its input tensor is shared differently between calibration windows")
                if first != name:
                    return  # the same tensor: already accumulated by `first`
                # float64 sums up to WIDE_HESSIAN inputs: the total then does not depend on how the windows were
                # grouped (one process, or torchrun's ranks summed), so every rank gets the one-process Hessian
                # to the last float32 bit and GPTQ makes the same decisions; above, float32 (memory)
                # (whatever the compute dtype: bf16/fp16 activations are widened before the product)
                dtype = torch.float64 if k <= WIDE_HESSIAN else torch.float32
                x = x.detach().reshape(-1, x.shape[-1]).to(dtype)
                if name not in hs:
                    hs[name] = torch.zeros(k, k, dtype=dtype, device=x.device)
                hs[name].addmm_(x.t(), x)
                counts[name] += x.shape[0]

            hooks.append(mod.register_forward_hook(hook))
        hooks.append(self.block.register_forward_pre_hook(block_call, with_kwargs=True))
        try:
            self.run_block(self.quant_inputs)
        finally:
            for h in hooks:
                h.remove()
        world = self.engine.world
        for name in names:
            if name not in leader:
                raise LowbitError(f"calibration never reached {name} (not called by its block)")
            lead = leader[name]
            if lead == name:
                if world is not None and world.enabled:  # torchrun: every rank's windows, summed (distributed.py)
                    world.sum_(hs[name])
                    counts[name] = world.sum_int(counts[name])
                hs[name] = hs[name].mul_(2.0 / max(counts[name], 1)).float()  # in place: no second copy
                if not all_finite(hs[name]):
                    raise LowbitError(f"calibration activations entering {name} contain NaN/Inf")
        for name in names:
            hs[name] = hs[leader[name]]
        _dump_hessians(self.prefix, {n: hs[n] for n in names if leader[n] == n}, world)
        return hs

    def record(self, name: str, info: dict) -> None:
        self.engine.calibration.info.setdefault(name, {}).update(info)


class Engine:
    """Runs a method over every decoder block of ``model`` on calibration ``windows``."""

    def __init__(self, model: nn.Module, method, windows: torch.Tensor | None, progress: bool = True,
                 batch_size: int = 1, plan=None, stream=None, world=None, placement=None, store=None):
        self.batch_size = batch_size
        # lowbit.compiler.engine.device.Placement: the device and compute dtype blocks are calibrated in (the model
        # itself stays on the CPU; one block at a time moves there and back)
        self.placement = placement if placement is not None else Placement()
        # lowbit.compiler.engine.activations.ActivationStore: the activation lists on the device, the CPU or disk
        self.store = store if store is not None else ActivationStore("device", self.placement)
        self.world = world  # lowbit.compiler.engine.distributed.World: Hessians summed over torchrun's ranks
        self.stream = stream  # lowbit.compiler.engine.stream.Streamer: block weights read and released in turn
        self.model = model
        self.method = method
        self.plan = plan  # lowbit.compiler.engine.overrides.MethodPlan, or None: every linear gets `method`
        self.windows = windows
        self.progress = progress
        self.prefix, self.blocks = find_blocks(model)
        self.quant_inputs = None
        self.float_inputs = None
        self.kwargs = {}
        self.extra_args = ()
        self.calibration = Calibration()

    def _calibrate_block(self, ctx) -> dict:
        """The block's linears, grouped by the method the overrides give them (one call per group)."""
        if self.plan is None:
            return self.method.calibrate_block(ctx)
        groups: dict = {}
        for name, mod in ctx.linears.items():
            m, rule = self.plan.method_for(name)
            if rule is not None:
                self.calibration.info.setdefault(name, {})["override"] = rule.describe()
            if m is not None:
                groups.setdefault(id(m), (m, {}))[1][name] = mod
        out = {}
        all_linears = ctx.linears
        for m, linears in groups.values():
            ctx.linears = linears
            out.update(m.calibrate_block(ctx))
        ctx.linears = all_linears
        return out

    def _calibrate_lm_head(self, cal) -> None:
        """Compress the output projection when a rule names it, on its inputs from the quantized model."""
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if head is None or not is_linear_like(head):
            return
        name = next(n for n, m in self.model.named_modules() if m is head)
        from lowbit.compiler.engine.overrides import first_match

        rule = first_match(self.plan.rules, name)
        if rule is None or rule.skip:
            if rule is not None:
                self.plan.used.add(rule.index)
            return
        if self.stream is not None:
            raise LowbitError(f"overrides: {rule.describe()}: --stream does not compress {name} yet "
                              "(compile without --stream)")
        m, _ = self.plan.method_for(name)
        if not hasattr(m, "quantize_linear") and m.needs_data:
            raise LowbitError(f"overrides: {rule.describe()}: method {m.name!r} cannot compress {name} alone")
        w = linear_weight(head)
        cal.float_weights[name] = w.clone()
        t0 = time.perf_counter()
        if hasattr(m, "quantize_linear"):
            if self.windows is None:
                raise LowbitError(f"overrides: {rule.describe()}: needs calibration data")
            k = w.shape[1]
            h = torch.zeros(k, k, dtype=torch.float64)
            count = [0]

            def hook(mod, args, out):
                x = args[0].reshape(-1, k).double()
                h.add_(x.t() @ x)
                count[0] += x.shape[0]

            handle = head.register_forward_hook(hook)
            try:
                with torch.no_grad():
                    for i in range(self.windows.shape[0]):
                        self.model(input_ids=self.windows[i : i + 1], use_cache=False)
            finally:
                handle.remove()
            if self.world is not None and self.world.enabled:
                self.world.sum_(h)
                count[0] = self.world.sum_int(count[0])
            fmt, info = m.quantize_linear(w, (2 * h / max(count[0], 1)).float())
        else:  # data-free (rtn): the same call as inside the blocks, on a one-linear context
            class _One:
                linears = {name: head}
                weight_of = staticmethod(linear_weight)
                set_weight = staticmethod(set_linear_weight)

            fmt = m.calibrate_block(_One())[name]
            info = {}
        set_linear_weight(head, fmt.dequantize())
        cal.results[name] = fmt
        cal.info.setdefault(name, {}).update({**info, "override": rule.describe()})
        if self.progress:
            _log(f"[calibrate] {name}: {rule.describe()} ({time.perf_counter() - t0:.1f}s)")

    # -- block I/O -------------------------------------------------------------------------------
    def call_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with self.placement.autocast():
            out = block(x, *self.extra_args, **self.kwargs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out if self.placement.default else self.placement.to(out)  # cached in the compute dtype

    def run_block(self, block: nn.Module, inputs: list) -> list:
        """Run ``block`` over cached windows, ``batch_size`` windows per call.

        The cached keyword arguments (rotary tables, masks) have batch 1 and broadcast; an architecture
        where they do not falls back to one window per call.
        """
        outs = self.store.new_list()
        bs = self.batch_size
        i = 0
        while i < len(inputs):
            chunk = [self.store.fetch(x) for x in inputs[i : i + bs]]
            if len(chunk) == 1:
                outs.append(self.store.keep(self.call_block(block, chunk[0])))
            else:
                try:
                    y = self.call_block(block, torch.cat(chunk, 0))
                except RuntimeError:
                    self.batch_size = bs = 1
                    continue
                for part in y.split(1, 0):
                    outs.append(self.store.keep(part))
            i += len(chunk)
        return outs

    def _capture_inputs(self) -> list:
        first = self.blocks[0]
        store = self.store.new_list()

        def pre_hook(mod, args, kwargs):
            if args:
                hidden, rest = args[0], tuple(args[1:])
            else:
                kwargs = dict(kwargs)
                hidden, rest = kwargs.pop("hidden_states"), ()
            if not store:
                self.extra_args = rest
                self.kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_states",)}
            store.append(self.store.keep(self.placement.to(hidden.detach())))
            raise _Captured

        h = first.register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            for i in range(self.windows.shape[0]):
                try:
                    self.model(input_ids=self.windows[i : i + 1], use_cache=False)
                except _Captured:
                    pass
        finally:
            h.remove()
        # Caches must not leak state between windows.
        for k in ("past_key_values", "past_key_value", "layer_past", "use_cache"):
            self.kwargs.pop(k, None)
        self.kwargs = self.placement.to(self.kwargs)  # rotary tables, masks: where the blocks run
        self.extra_args = self.placement.to(self.extra_args)
        if not store:
            raise LowbitError("no calibration input reached the first decoder block")
        if not _all_finite(store):
            bad = next(i for i, x in enumerate(store) if not torch.isfinite(x).all())
            raise LowbitError(f"calibration window {bad}: embeddings produced NaN/Inf")
        return store

    # -- main loop -------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self) -> Calibration:
        cal = self.calibration
        n = len(self.blocks)
        if self.method.needs_data:
            if self.windows is None:
                raise LowbitError(f"method {self.method.name!r} needs calibration data")
            t0 = time.perf_counter()
            if self.stream is not None:
                with self.stream.embedding():
                    self.quant_inputs = self._capture_inputs()
            else:
                self.quant_inputs = self._capture_inputs()
            if getattr(self.method, "needs_float_stream", False):
                self.float_inputs = self.store.collect(self.quant_inputs)
            if self.progress:
                _log(f"[calibrate] captured {len(self.quant_inputs)} windows x {self.windows.shape[1]} tokens "
                     f"at block 0 in {time.perf_counter() - t0:.1f}s")
        for i, block in enumerate(self.blocks):
            t0 = time.perf_counter()
            if self.stream is not None:
                self.stream.load_block(i, block)
            ctx = BlockContext(self, i, block, f"{self.prefix}.{i}")
            for name, mod in ctx.linears.items():
                w = linear_weight(mod)
                if not all_finite(w):
                    raise LowbitError(f"weight of {name} contains NaN/Inf")
                if self.stream is None:  # streaming keeps no float copy (the checkpoint is the copy)
                    cal.float_weights[name] = w.clone()
            saved = self.placement.enter_block(block)
            if self.float_inputs is not None:
                ctx.float_targets = ctx.run_block(self.float_inputs)
            block_results = self._calibrate_block(ctx)
            if self.quant_inputs is not None:
                self.quant_inputs = ctx.run_block(self.quant_inputs)
                ctx.quant_inputs = self.quant_inputs
                if not _all_finite(self.quant_inputs):
                    raise LowbitError(f"block {ctx.prefix} produced NaN/Inf after quantization")
            if self.float_inputs is not None:
                self.float_inputs = ctx.float_targets
            self.placement.exit_block(block, saved, keep={n.removeprefix(ctx.prefix + ".") + ".weight"
                                                          for n in ctx.linears})
            if self.stream is not None:
                block_results = self.stream.release_block(i, block, block_results)
            cal.results.update(block_results)
            dt = time.perf_counter() - t0
            cal.block_times.append(dt)
            if self.progress:
                _log(f"[calibrate] block {i + 1}/{n} {ctx.prefix}: {len(ctx.linears)} linears, {dt:.1f}s")
        if self.plan is not None:
            self._calibrate_lm_head(cal)
            self.plan.check_all_used()
        # Put the float weights back: the graph is captured from float, the rewrite inserts the packed ops.
        mods = dict(self.model.named_modules())
        for name, w in cal.float_weights.items():
            set_linear_weight(mods[name], w)
        return cal
