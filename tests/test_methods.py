"""Quality floors of the methods and their handling of degenerate input."""

import pytest
import torch

from lowbit.passes.methods import build_method
from lowbit.passes.methods.gptq import GPTQConfig, gptq_quantize
from lowbit.passes.methods.quant import rtn_quantize


def _correlated_inputs(k, n_tok=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n_tok, k // 4, generator=g)
    mix = torch.randn(k // 4, k, generator=g)
    return base @ mix + 0.1 * torch.randn(n_tok, k, generator=g) * torch.rand(k, generator=g) * 4


@pytest.mark.parametrize("bits,gs,act_order", [(4, 32, False), (3, 64, False), (2, 32, True), (3, 100, True)])
def test_gptq_beats_rtn_on_output_error(bits, gs, act_order):
    k, n = 160, 48
    x = _correlated_inputs(k)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.05
    h = 2 * x.t() @ x / x.shape[0]
    f, info = gptq_quantize(w, h, GPTQConfig(bits=bits, group_size=gs, act_order=act_order))
    r = rtn_quantize(w, bits, gs, False)

    def err(wq):
        return float((x @ (wq - w).t()).pow(2).mean())

    assert err(f.dequantize()) < 0.8 * err(r.dequantize())
    # static groups under act-order: each contiguous group's scale and zero point come from the original weights
    # (so they equal RTN's); without act-order they come from the error-updated weights as each group starts
    same = torch.equal(f.scales, r.scales) and torch.equal(f.zeros, r.zeros)
    assert same == act_order


def test_gptq_dead_inputs_and_zero_weight():
    k = 64
    x = _correlated_inputs(k)
    x[:, 5] = 0  # a column with zero Hessian diagonal
    h = 2 * x.t() @ x / x.shape[0]
    w = torch.randn(8, k) * 0.05
    w[2] = 0  # an all-zero row
    f, info = gptq_quantize(w, h, GPTQConfig(bits=3, group_size=16))
    deq = f.dequantize()
    assert torch.isfinite(deq).all()
    assert info["dead_inputs"] == 1
    assert torch.all(deq[2] == 0)
    zero_w = torch.zeros(4, k)
    f0, _ = gptq_quantize(zero_w, h, GPTQConfig(bits=2, group_size=16))
    assert torch.all(f0.dequantize() == 0)


def test_gptq_rejects_nonfinite_hessian():
    h = torch.eye(8)
    h[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(torch.randn(4, 8), h, GPTQConfig(bits=4, group_size=8))


@pytest.mark.parametrize("opts,match", [({"bits": 0}, "bits"), ({"bits": 9}, "bits"), ({"group_size": 0}, "group-size"),
                                        ({"damp": 2.0}, "damp"), ({"nonsense": 1}, "does not take")])
def test_method_options_validated(opts, match):
    with pytest.raises(ValueError, match=match):
        build_method("gptq", **opts)


def test_unknown_method():
    with pytest.raises(ValueError, match="available"):
        build_method("nope")


def test_preset_paper_sets_the_papers_setup_and_records_overrides(tiny_dir, text_file, tmp_path):
    import json

    from lowbit.compiler.frontend.cli import compile_main

    out = tmp_path / "b"
    # the user's flags win over the preset (--nsamples/--seqlen: the paper's 128 x 2048 is too long for the tiny run)
    rc = compile_main([str(tiny_dir("llama")), "--method", "billm", "--preset", "paper", "--billm-outlier-ratio", "50",
                       "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32", "-o", str(out), "-q"])
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())["method"]
    assert m["search_rows"] == 0 and m["mean_shift"] is False and m["search_on"] == "w"  # the paper's variant
    assert m["outlier_ratio"] == 50  # the user's
    p = m["preset"]
    assert p["name"] == "paper" and p["deviations"]
    assert p["overridden_by_user"] == {"outlier_ratio": {"paper": 0.0, "used": 50.0},
                                       "nsamples": {"paper": 128, "used": 4}, "seqlen": {"paper": 2048, "used": 32}}
    assert m["tag"].endswith("-paper")


def test_preset_paper_refused_for_methods_without_one(tiny_dir, text_file, tmp_path, capsys):
    from lowbit.compiler.frontend.cli import compile_main

    rc = compile_main([str(tiny_dir("llama")), "--method", "gptq", "--preset", "paper", "--calib", str(text_file),
                       "-o", str(tmp_path / "g"), "-q"])
    assert rc == 2
    assert "has no paper preset" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()
