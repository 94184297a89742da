"""EfficientQAT: the scale gradient of the op, Block-AP's stored = trained, quality against RTN, E2E-QP,
interrupted and resumed runs, refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lowbit import api
from lowbit.compiler.frontend.cli import compile_main
from lowbit.passes.methods import efficientqat
from lowbit.passes.methods.efficientqat import BlockAPLinear
from lowbit.passes.methods.quant import rtn_quantize
from lowbit.runtime.packing import unpack_rows
from quality import block_output_error


@pytest.mark.parametrize("k,gs,bits", [(45, 16, 3), (64, 32, 2)])
def test_affine_linear_gradients_match_autograd_through_dequantization(k, gs, bits):
    torch.manual_seed(0)
    n, r = 7, 2
    fmt = rtn_quantize(torch.randn(n, k), bits, gs, False)
    x = torch.randn(2, 3, k, requires_grad=True)
    sc = fmt.scales.float().clone().requires_grad_(True)
    bias = torch.randn(n, requires_grad=True)
    la, lb = torch.randn(r, k, requires_grad=True), torch.randn(n, r, requires_grad=True)
    y = torch.ops.lowbit.affine_linear(x, fmt.qweight, sc, fmt.zeros, bias, la, lb, bits, gs, k)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, sc, bias, la, lb), g)
    codes = unpack_rows(fmt.qweight, bits, k).float()
    z = unpack_rows(fmt.zeros, bits, sc.shape[1]).float()
    col = torch.arange(k) // gs
    w = (codes - z[:, col]) * sc[:, col]
    ref = torch.nn.functional.linear(x, w, bias) + (x @ la.t()) @ lb.t()
    want = torch.autograd.grad(ref, (x, sc, bias, la, lb), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,gs", [(96, 32), (70, 32)])
def test_block_ap_freeze_stores_what_was_trained(k, gs):
    torch.manual_seed(0)
    lin = BlockAPLinear(torch.randn(12, k) * 0.05, None, 2, gs)
    with torch.no_grad():  # as if trained: moved weights, scales on the fp16 grid, fractional zeros
        lin.weight.add_(torch.randn_like(lin.weight) * 0.01)
        lin.scale.copy_((lin.scale * 0.9).half().float())
        lin.zero.add_(0.3)
    fmt = lin.freeze()
    assert fmt.bits == 2 and not fmt.symmetric and fmt.in_features == k
    torch.testing.assert_close(fmt.dequantize(), lin.fake_weight().detach(), rtol=0, atol=1e-6)
    # every trainable tensor gets a gradient through the straight-through estimators
    lin(torch.randn(3, k)).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (lin.weight, lin.scale, lin.zero))


@pytest.fixture(scope="module")
def tiny_setup(tiny_dir, text_file):
    model, tok, _ = api.load_model(str(tiny_dir("llama")))
    windows, _ = api.calibration_data(tok, str(text_file), nsamples=8, seqlen=64)
    ids, _ = api.calibration_data(tok, str(text_file), nsamples=4, seqlen=64, seed=1)
    return model, windows, ids


def test_block_ap_beats_rtn_and_e2e_lowers_the_loss(tiny_setup):
    model, windows, ids = tiny_setup
    rtn = api.calibrate(model, "rtn", windows, bits=2, group_size=32, progress=False)
    bap = api.calibrate(model, "efficientqat", windows, bits=2, group_size=32, phases="block-ap", epochs=4,
                        lr_weight=1e-3, lr_quant=1e-2, val_windows=0, init="minmax", progress=False)
    # Block-AP's objective, block 0's output error on held-out windows: measured 0.39 against RTN's 1.23
    assert block_output_error(model, bap.results, ids)[0] < 0.5 * block_output_error(model, rtn.results, ids)[0]

    m = efficientqat.EfficientQAT(efficientqat.EfficientQATConfig(bits=2, group_size=32, phases="e2e-qp",
                                                                  e2e_lr=3e-3, e2e_epochs=3, e2e_batch_size=2))
    before = {n: f.scales.clone() for n, f in bap.results.items()}
    out = m.after_calibration(model, bap.results, windows, progress=False)
    hist = m.e2e_report["history"]
    assert hist[-1]["val_loss"] < hist[0]["val_loss"]
    for n, f in out.items():  # only the scales moved: codes and zero points are the Block-AP ones
        assert torch.equal(f.qweight, bap.results[n].qweight) and torch.equal(f.zeros, bap.results[n].zeros)
    assert any(not torch.equal(out[n].scales, before[n]) for n in out)
    assert all(p.requires_grad for p in model.parameters())  # the model is handed back as it was


def test_block_ap_starts_from_gptq_and_keeps_its_best(tiny_setup):
    model, windows, ids = tiny_setup
    gptq = api.calibrate(model, "gptq", windows, bits=2, group_size=32, progress=False)
    start = api.calibrate(model, "efficientqat", windows, bits=2, group_size=32, phases="block-ap", epochs=0,
                          progress=False)
    for n, f in gptq.results.items():  # no training: exactly GPTQ's codes, scales and zero points
        g = start.results[n]
        assert torch.equal(f.qweight, g.qweight) and torch.equal(f.scales, g.scales) and torch.equal(f.zeros, g.zeros)
    bap = api.calibrate(model, "efficientqat", windows, bits=2, group_size=32, phases="block-ap", epochs=4,
                        lr_weight=1e-3, lr_quant=1e-3, val_windows=2, progress=False)
    for name, info in bap.info.items():
        hist = info["block_ap_history"]
        kept = next(h for h in hist if h["epoch"] * 3 == info["block_ap_kept_step"])  # 6 train windows, batch 2
        assert info["block_ap_init"] == "gptq" and kept["val_loss"] == min(h["val_loss"] for h in hist)
        assert kept["val_loss"] < 0.985 * hist[0]["val_loss"], hist  # measured: -4.4% and -7.1%
    # the same objective measured independently, block 0 on other windows: 0.2495 (GPTQ) -> 0.2292
    assert block_output_error(model, bap.results, ids)[0] < 0.97 * block_output_error(model, gptq.results, ids)[0]
    # a diverging learning rate cannot make a block worse than its GPTQ start on held-out windows
    bad = api.calibrate(model, "efficientqat", windows, bits=2, group_size=32, phases="block-ap", epochs=1,
                        lr_weight=1.0, lr_quant=1.0, val_windows=2, progress=False)
    assert all(i["block_ap_kept_step"] == 0 for i in bad.info.values())
    for n, f in gptq.results.items():
        assert torch.equal(f.qweight, bad.results[n].qweight)


def _compile(tiny, text, out, *extra):
    return compile_main([str(tiny), "--method", "efficientqat", "--bits", "2", "--group-size", "32",
                         "--calib", str(text), "--nsamples", "8", "--seqlen", "32", "--eqat-epochs", "2",
                         "--eqat-batch-size", "2", "--eqat-val-windows", "2", "--e2e-batch-size", "2",
                         "--e2e-lr", "1e-3", "--checkpoint-every", "2", "--float-dtype", "float32", "-q",
                         "-o", str(out), *extra])


def test_interrupted_run_resumes_to_the_same_artifact(tiny_dir, text_file, tmp_path, monkeypatch, capsys):
    tiny = tiny_dir("llama")
    full = tmp_path / "full"
    assert _compile(tiny, text_file, full) == 0
    assert not (tmp_path / "full.ckpt").exists()
    report = json.loads((full / "report.json").read_text())
    assert report["method"]["phases"] == "block-ap,e2e-qp" and report["end_to_end"]["steps"] == 3

    # Ctrl-C in block 1 (of 2), step 3 of 6: no artifact, checkpoints of block 0 and of step 2 of block 1
    calls = {"n": 0}

    def interrupt(label, step):
        calls["n"] += 1
        if label.endswith(".1") and step == 3:
            raise KeyboardInterrupt

    part = tmp_path / "part"
    monkeypatch.setattr(efficientqat, "_after_step", interrupt)
    assert _compile(tiny, text_file, part) == 130
    assert not part.exists()
    ckpt = tmp_path / "part.ckpt"
    assert (ckpt / "block-0.pt").exists() and (ckpt / "block-current.pt").exists()
    assert _compile(tiny, text_file, part) == 2  # existing checkpoints need --resume or --overwrite
    assert _compile(tiny, text_file, part, "--resume", "--eqat-epochs", "3") == 2  # other options: refused
    monkeypatch.setattr(efficientqat, "_after_step", lambda label, step: None)
    capsys.readouterr()
    assert _compile(tiny, text_file, part, "--resume") == 0
    err = capsys.readouterr().err  # block 0 replayed, block 1 continued from its step-2 checkpoint
    assert "model.layers.0: restored from" in err and "model.layers.1: resumed at step 2/6" in err
    a, b = load_file(str(full / "packed.safetensors")), load_file(str(part / "packed.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not ckpt.exists()


def test_refusals(tiny_dir, text_file, tmp_path, capsys):
    tiny = tiny_dir("llama")
    assert _compile(tiny, text_file, tmp_path / "a", "--sym") == 2
    assert "asymmetric" in capsys.readouterr().err
    assert _compile(tiny, text_file, tmp_path / "b", "--phases", "block-ap,sgd") == 2
    assert "--phases" in capsys.readouterr().err
    assert _compile(tiny, text_file, tmp_path / "c", "--apiq-epochs", "3") == 2
    assert "applies to --method apiq" in capsys.readouterr().err
    assert compile_main([str(tiny), "--method", "gptq", "--resume", "-q", "--calib", str(text_file),
                         "-o", str(tmp_path / "d")]) == 2
    assert "--resume applies to methods with per-block checkpoints" in capsys.readouterr().err
    # a diverging Block-AP stops with a clear error and writes nothing
    assert _compile(tiny, text_file, tmp_path / "e", "--eqat-lr-weight", "1e30", "--eqat-lr-quant", "1e30") == 2
    assert "loss became" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
