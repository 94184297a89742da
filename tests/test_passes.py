"""Passes on every tiny architecture: find sites, rewrite, verify, clean up; and the pass manager."""

import pytest
import torch

from lowbit.compiler.engine import calibrate, capture, models
from lowbit.compiler.engine.tiny import ARCHS
from lowbit.passes import PassContext, PassError, PassManager, PassReport, default_passes
from lowbit.passes.methods import build_method
from lowbit.passes.sites import FindLinearSites


def _compile(arch, tiny_dir, method="gptq", **opts):
    model, tok, _ = models.load(str(tiny_dir(arch)))
    ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    cal = calibrate.Engine(model, build_method(method, **opts), ids, progress=False).run()
    ep = capture.capture(model)
    gm = ep.module()
    ctx = PassContext(results=cal.results, float_weights=cal.float_weights, calib_batch=ids[:1])
    reports = PassManager(default_passes()).run(gm, ctx)
    return model, cal, gm, ctx, reports, ids


@pytest.mark.parametrize("arch", ARCHS)
def test_rewrite_every_architecture(arch, tiny_dir):
    model, cal, gm, ctx, reports, ids = _compile(arch, tiny_dir, bits=4, group_size=16)
    by = {r.name: r for r in reports}
    n_blocks_linears = len(cal.results)
    assert n_blocks_linears > 0
    assert sum(by["replace-linears"].changed.values()) == n_blocks_linears
    # lm_head is outside the blocks: skipped, with a reason
    assert any("lm_head" in s for s, _ in by["replace-linears"].skipped)
    ops = [n for n in gm.graph.nodes if n.target == torch.ops.lowbit.affine_linear.default]
    assert len(ops) == n_blocks_linears
    assert all("nn_module_stack" in n.meta for n in ops)
    # No float copy of any quantized weight is left.
    names = {k for k, _ in gm.named_parameters()} | {k for k, _ in gm.named_buffers()}
    for m in cal.results:
        assert f"model.{m}.weight" not in names
    assert by["clean-up"].changed["float weights removed"] == n_blocks_linears
    # Per-layer SQNR is recorded and sane for 4 bits.
    assert all(ctx.metrics[m]["sqnr_db"] > 10 for m in cal.results)
    # The rewritten graph equals the eager model with dequantized weights (dequantize-then-matmul).
    mods = dict(model.named_modules())
    for m, f in cal.results.items():
        models.set_linear_weight(mods[m], f.dequantize())
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        out = gm(ids)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # And it re-exports with dynamic shapes.
    prog = capture.recapture(gm)
    torch.testing.assert_close(prog.module()(ids[:1, :7]), gm(ids[:1, :7]))


def test_gpt2_conv1d_is_addmm(tiny_dir):
    model, _, _ = models.load(str(tiny_dir("gpt2")))
    gm = capture.capture(model).module()
    ctx = PassContext()
    rep = FindLinearSites().run(gm, ctx)
    assert rep.details["by_kind"].get("addmm", 0) == 8
    assert {s.module_name for s in ctx.sites if s.kind == "addmm"} >= {"transformer.h.0.attn.c_attn"}


class _Boom:
    name = "user-boom"

    def run(self, gm, ctx):
        raise ValueError("kaboom")


class _Malformed:
    name = "user-malformed"

    def run(self, gm, ctx):
        node = next(n for n in gm.graph.nodes if n.op == "call_function")
        node.args = (object(),) + tuple(node.args[1:])  # not a node or constant the graph can lint
        return PassReport(self.name)


@pytest.mark.parametrize("bad,match", [(_Boom(), "kaboom"), (_Malformed(), "user-malformed")])
def test_pass_errors_name_the_pass_and_history(bad, match, tiny_dir):
    model, _, _ = models.load(str(tiny_dir("llama")))
    gm = capture.capture(model).module()
    with pytest.raises(PassError, match=match) as ei:
        PassManager([FindLinearSites(), bad]).run(gm, PassContext())
    assert ei.value.pass_name == bad.name
    assert ei.value.ran_before == ["find-linear-sites"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_rewrite_billm(arch, tiny_dir):
    model, cal, gm, ctx, reports, ids = _compile(arch, tiny_dir, method="billm", block_size=32)
    ops = [n for n in gm.graph.nodes if n.target == torch.ops.lowbit.binary_linear.default]
    assert len(ops) == len(cal.results) > 0
    assert all(ctx.metrics[m]["sqnr_db"] > 0 for m in cal.results)
    mods = dict(model.named_modules())
    for m, f in cal.results.items():
        models.set_linear_weight(mods[m], f.dequantize())
    with torch.no_grad():
        torch.testing.assert_close(gm(ids), model(input_ids=ids, use_cache=False).logits, rtol=1e-4, atol=1e-4)
