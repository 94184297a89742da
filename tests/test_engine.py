"""The block-sequential engine: what it hands to methods, and model resolution."""

import pytest
import torch

from lowbit.compiler.engine import calibrate, models
from lowbit.errors import LowbitError
from lowbit.passes.methods.base import Method, UniformConfig
from lowbit.passes.methods.quant import rtn_quantize


class _Probe(Method):
    name = "probe"
    Config = UniformConfig
    needs_float_stream = True

    def __init__(self, config):
        super().__init__(config)
        self.seen = []

    def calibrate_block(self, ctx):
        # float targets are the float block applied to float inputs
        ref = ctx.run_block(ctx.float_inputs)
        assert all(torch.equal(a, b) for a, b in zip(ref, ctx.float_targets))
        hs = ctx.hessians(list(ctx.linears))
        out = {}
        for name, mod in ctx.linears.items():
            assert hs[name].shape[0] == ctx.weight_of(mod).shape[1]
            assert torch.allclose(hs[name], hs[name].t(), atol=1e-4)
            f = rtn_quantize(ctx.weight_of(mod), 2, 16, False)
            ctx.set_weight(mod, f.dequantize())
            out[name] = f
        drift = max(float((q - f).abs().max()) for q, f in zip(ctx.quant_inputs, ctx.float_inputs))
        self.seen.append((ctx.index, drift))
        return out


def test_engine_streams_and_restores_float_weights(tiny_dir):
    model, _, _ = models.load(str(tiny_dir("llama")))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 256, (3, 20))
    m = _Probe(UniformConfig())
    cal = calibrate.Engine(model, m, ids, progress=False).run()
    assert [i for i, _ in m.seen] == [0, 1]
    assert m.seen[0][1] == 0  # block 0: both streams start from the same embeddings
    assert m.seen[1][1] > 0  # block 1: the quantized chain has drifted from the float chain
    for n, p in model.named_parameters():  # float weights are back in the model
        assert torch.equal(p, before[n]), n
    assert len(cal.results) == len(cal.float_weights) == 14


def test_linears_reading_one_input_share_one_hessian(tiny_dir):
    """q/k/v and gate/up read the same tensor: one Hessian each group, equal to the one computed alone."""
    model, _, _ = models.load(str(tiny_dir("llama")))
    eng = calibrate.Engine(model, _Probe(UniformConfig()), torch.randint(0, 256, (3, 20)), progress=False)
    eng.quant_inputs = eng._capture_inputs()
    ctx = calibrate.BlockContext(eng, 0, eng.blocks[0], "model.layers.0")
    hs = ctx.hessians(list(ctx.linears))
    p = "model.layers.0."
    assert hs[p + "self_attn.q_proj"] is hs[p + "self_attn.k_proj"] is hs[p + "self_attn.v_proj"]
    assert hs[p + "mlp.gate_proj"] is hs[p + "mlp.up_proj"]
    distinct = {id(h) for h in hs.values()}
    assert len(distinct) == 4  # attention input, o_proj, MLP input, down_proj
    for name in (p + "self_attn.v_proj", p + "mlp.up_proj", p + "mlp.down_proj"):
        alone = ctx.hessians([name])[name]
        assert torch.allclose(alone, hs[name], rtol=1e-6, atol=1e-6), name
    from lowbit.passes.methods.base import take_hessian

    q = take_hessian(hs, p + "self_attn.q_proj")
    assert q is not hs[p + "self_attn.k_proj"] and torch.equal(q, hs[p + "self_attn.k_proj"])  # still shared: a copy
    take_hessian(hs, p + "self_attn.k_proj")
    assert take_hessian(hs, p + "self_attn.v_proj") is not None and p + "self_attn.v_proj" not in hs


def test_resolve_alias_and_gguf_path(tmp_path):
    src = models.resolve("smollm2-135m")
    assert src.kind == "gguf" and src.path.is_file() and src.path.suffix == ".gguf"
    assert models.resolve(str(src.path)).kind == "gguf"
    (tmp_path / "x.bin").write_bytes(b"0")
    with pytest.raises(LowbitError, match="not a .gguf"):
        models.resolve(str(tmp_path / "x.bin"))
    with pytest.raises(LowbitError, match="config.json"):
        models.resolve(str(tmp_path))
