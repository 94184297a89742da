"""ApiQ (bw/lw), the QLoRA and LoftQ initializations, and lowbit-finetune (training, resume, refusals)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lowbit import api
from lowbit.errors import LowbitError
from lowbit.compiler.frontend.cli import compile_main, finetune_main
from lowbit.passes.methods.training import attach
from lowbit.compiler.engine.rebuild import rebuild_model
from lowbit.passes.methods.lora import LWCQuantizer, loftq_init
from lowbit.passes.methods.quant import rtn_quantize
from lowbit.runtime.artifact import load
from lowbit.runtime.checkpoint_io import load_checkpoint
from quality import block_output_error


@pytest.mark.parametrize("sym,k,gs", [(False, 96, 32), (True, 96, 32), (False, 70, 32)])
def test_lwc_freeze_stores_what_was_trained(sym, k, gs):
    w = torch.randn(24, k) * 0.05
    q = LWCQuantizer(24, k, 2, gs, sym)
    with torch.no_grad():
        q.gamma_up.uniform_(0.5, 4)
        q.gamma_low.uniform_(0.5, 4)
    fmt = q.freeze(w)
    # the trained fake quantization and the packed format differ only by the fp16 rounding of the scales
    fake = q(w).detach()
    assert fmt.bits == 2 and fmt.symmetric == sym and fmt.in_features == k
    # (a rounded fp16 scale can move a value sitting on a rounding boundary by one code: rare)
    diff = (fmt.dequantize() - fake).abs()
    assert (diff > 1e-3 * w.abs().max()).float().mean() < 0.02
    # gradients reach the clipping logits through the straight-through rounding
    q(w).pow(2).sum().backward()
    assert q.gamma_up.grad.abs().sum() > 0 and q.gamma_low.grad.abs().sum() > 0


def test_loftq_beats_rtn_on_weight_error():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g) * 0.02 + torch.randn(64, 4, generator=g) @ torch.randn(4, 128, generator=g) * 0.01
    rtn = rtn_quantize(w, 2, 32, False)
    one = loftq_init(w, 8, 2, 32, False, iters=1)
    five = loftq_init(w, 8, 2, 32, False, iters=5)

    def err(f):
        return float((f.dequantize() - w).norm() / w.norm())

    assert five.lowrank.rank == 8 and five.lowrank.lora_a.dtype == torch.float16
    assert err(five) < err(one) < 0.9 * err(rtn)


@pytest.fixture(scope="module")
def tiny_setup(tiny_dir, text_file):
    model, tok, _ = api.load_model(str(tiny_dir("llama")))
    windows, _ = api.calibration_data(tok, str(text_file), nsamples=8, seqlen=64)
    ids, _ = api.calibration_data(tok, str(text_file), nsamples=4, seqlen=64, seed=1)
    return model, windows, ids


def test_apiq_beats_the_baseline_initializations(tiny_setup):
    # ApiQ trains each block (bw) or linear (lw) to keep the float output; measured on held-out windows at
    # block 0 (float inputs in every run): QLoRA 1.23, LoftQ 0.83, lw 0.71, bw 0.60 (torch 2.13 CPU).
    model, windows, ids = tiny_setup
    common = dict(bits=2, group_size=32, rank=4, progress=False)
    errs = {}
    for label, opts in {"qlora": dict(init="qlora"), "loftq": dict(init="loftq"),
                        "lw": dict(mode="lw", epochs=3), "bw": dict(mode="bw", epochs=3)}.items():
        cal = api.calibrate(model, "apiq", windows, **common, **opts)
        errs[label] = block_output_error(model, cal.results, ids)[0]
        f = cal.results["model.layers.0.self_attn.q_proj"]
        assert f.lowrank is not None and f.lowrank.rank == 4 and f.bits == 2
        if label in ("lw", "bw"):  # trained: B moved away from zero
            assert f.lowrank.lora_b.float().abs().max() > 0
    assert errs["loftq"] < 0.8 * errs["qlora"], errs
    assert errs["bw"] < 0.85 * errs["loftq"] and errs["lw"] < 0.95 * errs["loftq"], errs


def test_lora_targets_and_bits_count_the_branch(tiny_dir, text_file, tmp_path):
    out = tmp_path / "a"
    argv = [str(tiny_dir("llama")), "--method", "apiq", "--lora-init", "qlora", "--lora-rank", "4",
            "--lora-targets", "q_proj,v_proj", "--calib", str(text_file), "--nsamples", "2", "--seqlen", "32",
            "--float-dtype", "float32", "-q", "-o", str(out)]
    assert compile_main(argv) == 0
    # the fine-tuning model (rebuilt, LoRA layers trainable, the others frozen ops) computes what the artifact does
    art = load(out)
    model = rebuild_model(art)
    trained = attach(model, art.formats, "lora")
    assert {n.rsplit(".", 1)[-1] for n in trained} == {"q_proj", "v_proj"}
    ids = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, art(ids), rtol=1e-4, atol=1e-4)
    mods = json.loads((out / "manifest.json").read_text())["modules"]
    ranks = {n.rsplit(".", 1)[-1]: m["format"]["rank"] for n, m in mods.items()}
    assert ranks["q_proj"] == ranks["v_proj"] == 4 and ranks["k_proj"] == ranks["down_proj"] == 0
    # v_proj and k_proj have the same shape; only v_proj carries the fp16 rank-4 branch
    v, k = mods["model.layers.0.self_attn.v_proj"], mods["model.layers.0.self_attn.k_proj"]
    n, kk = v["format"]["out_features"], v["format"]["in_features"]
    lora_bytes = 2 * 4 * (n + kk)
    assert v["nbytes"] - k["nbytes"] == lora_bytes
    assert abs(v["bits_per_weight"] - k["bits_per_weight"] - 8 * lora_bytes / (n * kk)) < 1e-9


def _finetune(art, out, *extra):
    return finetune_main([str(art), "--data", str(_finetune.text), "--nsamples", "6", "--seqlen", "32",
                          "--val-samples", "2", "--batch-size", "2", "--epochs", "2", "--checkpoint-every", "2",
                          "--lr", "3e-3", "-q", "-o", str(out), *extra])


@pytest.fixture(scope="module")
def apiq_artifact(tiny_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("apiq") / "art"
    argv = [str(tiny_dir("llama")), "--method", "apiq", "--bits", "2", "--group-size", "32", "--lora-rank", "4",
            "--apiq-epochs", "1", "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32", "-q",
            "--float-dtype", "float32", "-o", str(out)]
    assert compile_main(argv) == 0
    _finetune.text = text_file
    return out


def _loras(d):
    t = load_file(str(d / "packed.safetensors"))
    return {k: v for k, v in t.items() if "lora" in k}


def test_finetune_trains_only_lora_and_resume_is_exact(apiq_artifact, tmp_path):
    full = tmp_path / "full"
    assert _finetune(apiq_artifact, full) == 0
    report = json.loads((full / "finetune.json").read_text())
    vals = [h["val_loss"] for h in report["history"] if "val_loss" in h]
    assert vals[-1] < vals[0]  # training lowers the held-out loss
    before, after = load(apiq_artifact), load(full)
    for name, f in before.formats.items():  # packed base untouched, LoRA changed
        g = after.formats[name]
        assert torch.equal(f.qweight, g.qweight) and torch.equal(f.scales, g.scales)
    assert any(not torch.equal(before.formats[n].lowrank.lora_b, after.formats[n].lowrank.lora_b)
               for n in before.formats)
    assert not (tmp_path / "full.ckpt").exists()  # removed once the artifact is complete

    # interrupted after 3 of 6 steps, then resumed: same tensors as the uninterrupted run
    part = tmp_path / "part"
    assert _finetune(apiq_artifact, part, "--stop-after", "3") == 0
    assert not part.exists() and (tmp_path / "part.ckpt" / "finetune.pt").exists()
    assert _finetune(apiq_artifact, part) == 2  # an existing checkpoint needs --resume or --overwrite
    state = load_checkpoint(tmp_path / "part.ckpt" / "finetune.pt")
    assert state["step"] == 3 and state["train_s"] > 0 and json.loads(state["devices"]) == ["cpu"]
    assert _finetune(apiq_artifact, part, "--resume") == 0
    resumed = json.loads((part / "finetune.json").read_text())
    # the training time counts both runs (a GPU run finished on the CPU reports its whole time and both devices)
    assert resumed["train_s"] > state["train_s"] and resumed["devices"] == ["cpu"]
    a, b = _loras(full), _loras(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 200, (1, 9))
    torch.testing.assert_close(load(part)(ids), after(ids), rtol=0, atol=0)


def test_a_step_too_big_for_memory_runs_in_micro_batches_with_the_same_result(apiq_artifact, tmp_path, monkeypatch):
    from lowbit.passes.methods import training
    from lowbit.runtime import resources

    # the choice: the largest halving of the batch that fits what is available; none fitting is refused clearly
    art = load(apiq_artifact)
    model = rebuild_model(art)
    modules = attach(model, art.formats, "lora")
    one, four = (training.training_bytes(model, modules, m, 32) for m in (1, 4))
    monkeypatch.setattr(resources, "available_bytes", lambda: one)  # one window, without headroom: still tried
    assert training.micro_batch(model, modules, 4, 32, "t") == 1
    monkeypatch.setattr(resources, "available_bytes", lambda: int(four / training.HEADROOM) + 1)
    assert training.micro_batch(model, modules, 4, 32, "t") == 4
    monkeypatch.setattr(resources, "available_bytes", lambda: four)  # fits, but not with the estimate's headroom
    assert training.micro_batch(model, modules, 4, 32, "t") < 4
    monkeypatch.setattr(resources, "available_bytes", lambda: one - 1)
    with pytest.raises(LowbitError, match="one training window needs about"):
        training.micro_batch(model, modules, 4, 32, "t")
    monkeypatch.undo()

    # the same steps through micro-batches of one window: the same tensors up to float summation order
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert _finetune(apiq_artifact, whole) == 0
    monkeypatch.setattr(training, "micro_batch", lambda *a, **k: 1)
    assert _finetune(apiq_artifact, parts) == 0
    a, b = _loras(whole), _loras(parts)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
    assert any(not torch.equal(a[k], _loras(apiq_artifact)[k]) for k in a)  # and training did change them
    losses = [[h["loss"] for h in json.loads((d / "finetune.json").read_text())["history"] if "loss" in h]
              for d in (whole, parts)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)  # each step's loss: the mean over all its windows


def test_finetune_refusals(apiq_artifact, tiny_dir, text_file, tmp_path, capsys):
    gptq = tmp_path / "gptq"
    assert compile_main([str(tiny_dir("llama")), "--method", "rtn", "--bits", "4", "--group-size", "32", "-q",
                         "-o", str(gptq)]) == 0
    assert _finetune(gptq, tmp_path / "x") == 2
    assert "no LoRA branch" in capsys.readouterr().err
    assert finetune_main([str(apiq_artifact), "--data", "wikitext2", "-q", "-o", str(tmp_path / "y")]) == 2
    # a diverging run stops with a clear error and writes no artifact
    assert _finetune(apiq_artifact, tmp_path / "z", "--lr", "1e30") == 2
    assert "training loss became" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()
    # a checkpoint from other options is not resumed silently
    assert _finetune(apiq_artifact, tmp_path / "w", "--stop-after", "1") == 0
    assert _finetune(apiq_artifact, tmp_path / "w", "--resume", "--lr", "1e-3") == 2
    assert "other training options" in capsys.readouterr().err
    # --lr-quant belongs to --train all; a GPU that is not there is refused before anything loads
    assert _finetune(apiq_artifact, tmp_path / "v", "--lr-quant", "1e-4") == 2
    assert "--lr-quant applies to --train all" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert _finetune(apiq_artifact, tmp_path / "u", "--device", "cuda") == 2
        assert "--device cuda: " in capsys.readouterr().err
    assert not (tmp_path / "v").exists() and not (tmp_path / "u").exists()
    # BiLLM's binary layers have nothing continuous to train beyond what --train all lists
    billm = tmp_path / "billm"
    assert compile_main([str(tiny_dir("llama")), "--method", "billm", "-q", "-o", str(billm)]) == 0
    assert _finetune(billm, tmp_path / "t", "--train", "all") == 2
    assert "no uniform or VQ layer to train" in capsys.readouterr().err
