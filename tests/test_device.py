"""``--device`` and ``--compute-dtype``: bad devices refused before any work, a bfloat16 autocast that keeps
GPTQ's quality, refusals for the methods that cannot run there yet, and blocks that come back from the device
with their own tensors. (The CUDA path itself needs a GPU: README, "Calibrating on a GPU".)"""

import json

import pytest
import torch
from torch import nn

from lowbit.compiler.engine.device import Placement
from lowbit.compiler.frontend.cli import compile_main
from lowbit.runtime.artifact import load


def _compile(model, text_file, out, *extra) -> int:
    return compile_main([str(model), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "64", "-o", str(out),
                         "-q", *extra])


@pytest.mark.parametrize("device,message", [
    ("cuda", "--device cuda: "),
    ("cuda:x", "expected cuda:N"),
    ("tpu", "--device must be cpu, cuda, cuda:N or auto"),
])
def test_bad_device_is_refused_before_loading(tiny_dir, text_file, tmp_path, capsys, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    model = tiny_dir("llama")
    capsys.readouterr()  # the fixture's own output
    assert _compile(model, text_file, tmp_path / "out", "--method", "rtn", "--device", device) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a staging directory


def test_bfloat16_compute_keeps_gptq_quality(tiny_dir, text_file, tmp_path):
    model = tiny_dir("llama")
    args = ["--method", "gptq", "--bits", "3", "--group-size", "32"]
    assert _compile(model, text_file, tmp_path / "f32", *args) == 0
    assert _compile(model, text_file, tmp_path / "bf16", *args, "--compute-dtype", "bfloat16", "--device", "auto") == 0
    a, b = load(tmp_path / "f32"), load(tmp_path / "bf16")
    assert b.manifest["calibration_run"]["compute_dtype"] == "bfloat16"
    assert b.manifest["calibration_run"]["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert a.manifest["calibration_run"]["compute_dtype"] == "float32"
    loss = {t: sum(v["gptq_loss"] for v in json.loads((tmp_path / t / "report.json").read_text())["layers"].values())
            for t in ("f32", "bf16")}
    # the Hessians come from bfloat16 activations, the solve is float32: the same quality within a few percent
    assert loss["bf16"] == pytest.approx(loss["f32"], rel=0.05), loss
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 200, (1, 32))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(model)(input_ids=ids).logits
    err = {t: float((m(ids) - ref).norm() / ref.norm()) for t, m in (("f32", a), ("bf16", b))}
    assert err["bf16"] < 1.15 * err["f32"], err  # as close to the float model as the float32 calibration


def _bfloat16_as_close_as_float32(model, tmp_path) -> None:
    """The artifacts in tmp_path/f32 and tmp_path/bf16 (compiled with bfloat16 compute): the second as close to the
    float model's logits as the first (within 15%)."""
    a, b = load(tmp_path / "f32"), load(tmp_path / "bf16")
    assert b.manifest["calibration_run"]["compute_dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 200, (1, 32))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(model)(input_ids=ids).logits
    err = {t: float((m(ids) - ref).norm() / ref.norm()) for t, m in (("f32", a), ("bf16", b))}
    assert err["bf16"] < 1.15 * err["f32"], err


def test_billm_solves_where_its_block_is(tiny_dir, text_file, tmp_path):
    """BiLLM is device-ready (its whole solve runs on the block's device, the format comes back on the CPU): with
    bfloat16 compute it gets the bfloat16 weight and still binarizes as well as the float32 run."""
    from lowbit.passes.methods.billm import BiLLMConfig, billm_quantize

    model = tiny_dir("llama")
    assert _compile(model, text_file, tmp_path / "f32", "--method", "billm") == 0
    assert _compile(model, text_file, tmp_path / "bf16", "--method", "billm", "--compute-dtype", "bfloat16") == 0
    _bfloat16_as_close_as_float32(model, tmp_path)
    # the solve itself: a bfloat16 weight in, the same binarization as its float32 copy, every plane on the CPU
    w = torch.randn(48, 96).bfloat16()
    x = torch.randn(256, 96)
    fa, _ = billm_quantize(w, x.T @ x, BiLLMConfig(block_size=32))
    fb, _ = billm_quantize(w.float(), (x.T @ x).double(), BiLLMConfig(block_size=32))
    assert torch.equal(fa.signs, fb.signs) and torch.equal(fa.dequantize(), fb.dequantize())
    assert all(t.device.type == "cpu" for t in (fa.signs, fa.alphas, fa.salient_cols, fa.group))


def test_reallm_solves_where_its_block_is(tiny_dir, text_file, tmp_path):
    """ReALLM is device-ready: with bfloat16 compute (the path ``--device cuda`` takes) the search, the
    decompositions and the block fine-tuning take the block's own weights and the artifact is as close to the float
    model as the float32 run's; a bfloat16 weight decomposes as its float32 copy, with every tensor on the CPU."""
    from lowbit.passes.methods.reallm import Candidate, ReALLMConfig, decompose

    model = tiny_dir("llama")
    args = ["--method", "reallm", "--bits-budget", "6", "--reallm-candidates", "d2b4g32r2",
            "--reallm-block-epochs", "1"]
    assert _compile(model, text_file, tmp_path / "f32", *args) == 0
    assert _compile(model, text_file, tmp_path / "bf16", *args, "--compute-dtype", "bfloat16") == 0
    _bfloat16_as_close_as_float32(model, tmp_path)
    w = torch.randn(48, 96).bfloat16()
    x = torch.randn(256, 96)
    cand, cfg = Candidate(2, 5, 32, 4), ReALLMConfig()
    fa, ea = decompose(w, x.T @ x, cand, cfg, torch.Generator().manual_seed(0), feedback=True)
    fb, eb = decompose(w.float(), x.T @ x, cand, cfg, torch.Generator().manual_seed(0), feedback=True)
    assert torch.equal(fa.codes, fb.codes) and torch.equal(fa.dequantize(), fb.dequantize()) and ea == eb
    assert all(t.device.type == "cpu" for t in fa.tensors().values())


def test_training_methods_refuse_other_devices_and_dtypes(tiny_dir, text_file, tmp_path, capsys):
    assert _compile(tiny_dir("llama"), text_file, tmp_path / "out", "--method", "apiq",
                    "--compute-dtype", "bfloat16") == 2
    err = capsys.readouterr().err
    assert "apiq trains on the CPU in float32 only for now" in err
    assert not (tmp_path / "out").exists()


def test_a_block_comes_back_with_its_own_tensors():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    block[1].register_buffer("steps", torch.arange(3))
    norm_before = block[1].weight.detach().clone()
    saved = {("p", n): p.data for n, p in block.named_parameters()}
    saved.update({("b", n): b for n, b in block.named_buffers()})
    block.to(torch.float64)  # stands in for the copy on the device
    block[0].weight.data.fill_(0.5)  # the quantized values, set on the device
    block[1].weight.data.mul_(3)  # anything else a forward might have touched is not kept
    Placement().exit_block(block, saved, keep={"0.weight"})
    assert block[0].weight.dtype == torch.float32 and block[0].weight.data_ptr() == saved[("p", "0.weight")].data_ptr()
    assert torch.equal(block[0].weight, torch.full((4, 4), 0.5))
    assert torch.equal(block[1].weight, norm_before)
    assert block[1].weight.data_ptr() == saved[("p", "1.weight")].data_ptr()
    assert block[1].steps is saved[("b", "1.steps")]


def test_placement_moves_nested_arguments():
    p = Placement(torch.device("cpu"), torch.bfloat16)
    out = p.to({"pos": (torch.ones(2), torch.zeros(2)), "mask": torch.ones(2, dtype=torch.bool), "n": 3})
    assert out["pos"][0].dtype == torch.bfloat16 and out["mask"].dtype == torch.bool and out["n"] == 3
    assert isinstance(out["pos"], tuple)


# -- activations: --activations, --offload-dir -------------------------------------------------------------------


@pytest.mark.parametrize("method", [
    ["--method", "gptq", "--bits", "3", "--group-size", "32"],
    pytest.param(["--method", "apiq", "--apiq-epochs", "1"], marks=pytest.mark.slow),  # a training method: float chain
])
def test_activations_on_disk_give_the_same_artifact(tiny_dir, text_file, tmp_path, method):
    model = tiny_dir("llama")
    assert _compile(model, text_file, tmp_path / "mem", *method, "--activations", "cpu") == 0
    off = tmp_path / "offload"
    assert _compile(model, text_file, tmp_path / "disk", *method, "--offload-dir", str(off)) == 0
    for f in ("packed.safetensors", "float.safetensors"):
        assert (tmp_path / "mem" / f).read_bytes() == (tmp_path / "disk" / f).read_bytes(), f
    assert not off.exists()  # made by the run, empty (its files never had names), removed


def test_offload_dir_refused_before_calibration(tiny_dir, text_file, tmp_path, capsys, monkeypatch):
    model = tiny_dir("llama")
    capsys.readouterr()
    (tmp_path / "a-file").write_text("x")
    assert _compile(model, text_file, tmp_path / "out", "--method", "gptq", "--offload-dir",
                    str(tmp_path / "a-file" / "sub")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not writable" in err[0], err
    # a directory without room for two generations of activations
    import lowbit.compiler.engine.activations as acts

    monkeypatch.setattr(acts, "_free_bytes", lambda p: 1000)
    assert _compile(model, text_file, tmp_path / "out", "--method", "gptq", "--offload-dir",
                    str(tmp_path / "room")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "GiB free, the calibration activations need" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # no output, no offload directory left


def test_disk_list_reads_back_what_was_written(tmp_path):
    from lowbit.compiler.engine.activations import DiskList

    d = DiskList(tmp_path, Placement())
    xs = [torch.randn(1, 5, 8), torch.randn(1, 3, 8).to(torch.bfloat16), torch.full((1, 2, 8), float("nan"))]
    for x in xs[:2]:
        d.append(x)
    assert d.all_finite and len(d) == 2 and list(tmp_path.iterdir()) == []  # no named file
    assert torch.equal(d[0], xs[0]) and torch.equal(d[1], xs[1]) and d[1].dtype == torch.bfloat16
    assert [t.shape for t in d[0:2]] == [xs[0].shape, xs[1].shape]
    d.append(xs[2])
    assert not d.all_finite
    d.close()


def test_training_phase_refused_when_memory_will_not_suffice(tiny_dir, text_file, tmp_path, capsys, monkeypatch):
    import lowbit.runtime.resources as res

    model = tiny_dir("llama")
    capsys.readouterr()
    # 1 KiB left when E2E-QP starts: not even one window fits (a batch that does not fit runs in micro-batches)
    monkeypatch.setattr(res, "available_bytes", lambda: 1 << 10)
    assert _compile(model, text_file, tmp_path / "out", "--method", "efficientqat", "--eqat-epochs", "1",
                    "--activations", "cpu") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "e2e-qp: one training window needs about" in err[-1] and "GiB is available" in err[-1], err[-3:]
    assert not (tmp_path / "out").exists()
