"""End to end through the command line on a tiny model; every bad input fails cleanly."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowbit.compiler.frontend.cli import compile_main
from lowbit.runtime.artifact import ArtifactError, load


BASE = ["--method", "gptq", "--bits", "4", "--group-size", "32", "--nsamples", "4", "--seqlen", "64", "-q"]


def _args(model, calib, out, *extra):
    return [str(model), *BASE, "--calib", str(calib), "-o", str(out), *extra]


@pytest.fixture(scope="module")
def artifact(tiny_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "tiny-gptq"
    rc = compile_main(_args(tiny_dir("llama"), text_file, out, "--eval", str(text_file), "--eval-windows", "2",
                            "--eval-seqlen", "128", "--float-dtype", "float32"))
    assert rc == 0
    return out


def _ppl(logits_fn, ids: torch.Tensor, seqlen: int, windows: int) -> float:
    """exp(mean next-token NLL) over the first windows, from log-softmax (independent of lowbit's evaluator)."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(windows):
            w = ids[i * seqlen:(i + 1) * seqlen]
            logp = torch.log_softmax(logits_fn(w[None]).double()[0, :-1], dim=-1)
            nll -= float(logp.gather(1, w[1:, None]).sum())
            count += seqlen - 1
    return math.exp(nll / count)


def test_artifact_contents_and_report(artifact):
    names = {p.name for p in artifact.iterdir()}
    assert {"manifest.json", "packed.safetensors", "float.safetensors", "program.pt2", "report.md", "report.json",
            "layer_error.png", "tokenizer"} <= names
    assert not [p for p in artifact.parent.iterdir() if ".partial-" in p.name]
    man = json.loads((artifact / "manifest.json").read_text())
    assert man["method"]["method"] == "gptq" and man["calibration"]["file_sha256"]
    assert len(man["modules"]) == 14
    rep = json.loads((artifact / "report.json").read_text())
    ev = next(iter(rep["eval"].values()))
    # the reported perplexities, recomputed: the float model from its directory, "after" from the artifact
    from transformers import AutoModelForCausalLM

    art = load(artifact)
    ids = torch.tensor(art.tokenizer(Path(ev["data"]["path"]).read_text())["input_ids"])
    fmodel = AutoModelForCausalLM.from_pretrained(rep["model"]["source"], dtype=torch.float32).eval()
    before = _ppl(lambda x: fmodel(input_ids=x, use_cache=False).logits, ids, 128, 2)
    after = _ppl(art, ids, 128, 2)
    assert abs(ev["before"]["ppl"] / before - 1) < 1e-4 and abs(ev["after"]["ppl"] / after - 1) < 1e-4, (ev, before, after)
    assert after != before
    s = rep["summary"]
    # Per row: ceil(K*4/8) code bytes + 2 bytes per group of 32 (fp16 scale) + ceil(G*4/8) zero-point bytes.
    nbytes = weights = 0
    for m in man["modules"].values():
        n, k = m["format"]["out_features"], m["format"]["in_features"]
        g = -(-k // 32)
        nbytes += n * (-(-k * 4 // 8) + 2 * g + -(-g * 4 // 8))
        weights += n * k
    assert abs(s["bits_per_weight"] - 8 * nbytes / weights) < 1e-9
    assert 4.625 <= s["bits_per_weight"] < 4.7
    assert s["bits_per_weight"] <= s["bits_per_weight_on_disk"] < s["bits_per_weight"] * 1.1
    # the file's size from its layout: 8-byte header length, the JSON header, then every packed tensor's bytes
    elem = {"torch.uint8": 1, "torch.int8": 1, "torch.float16": 2, "torch.int16": 2, "torch.int32": 4, "torch.float32": 4}
    data = sum(math.prod(t["shape"]) * elem[t["dtype"]] for t in man["tensors"].values() if t["file"] == "packed.safetensors")
    with open(artifact / "packed.safetensors", "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    assert s["packed_file_bytes"] == 8 + header + data
    assert abs(s["bits_per_weight_on_disk"] - 8 * (8 + header + data) / weights) < 1e-9


def test_reload_in_fresh_process_matches_in_memory(artifact, tmp_path):
    a = load(artifact)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    in_memory = a(ids)
    # Reference: dequantize the packed weights and run a float matmul (dense eager model).
    from lowbit.compiler.engine import models

    model, _, _ = models.load(a.manifest["model"]["source"])
    mods = dict(model.named_modules())
    for name, fmt in a.formats.items():
        models.set_linear_weight(mods[name], fmt.dequantize())
    with torch.no_grad():
        dense = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(in_memory, dense, rtol=1e-4, atol=1e-4)
    code = (
        "import sys, torch; from lowbit.runtime import load; a = load(sys.argv[1]); "
        "ids = torch.load(sys.argv[2]); torch.save(a(ids), sys.argv[3])"
    )
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", code, str(artifact), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
                   check=True)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), in_memory, rtol=0, atol=0)


def test_lowbit_run_generates(artifact, capsys):
    from lowbit.compiler.frontend.cli import run_main

    assert run_main([str(artifact), "--prompt", "the river", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("the river")


def test_corrupted_artifact_is_refused(artifact, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    p = bad / "packed.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        load(bad)
    p.write_bytes(bytes(data[:-10]))
    with pytest.raises(ArtifactError, match="truncated"):
        load(bad)
    (bad / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        load(bad)


def _fails(capsys, argv, match, out=None):
    assert compile_main(argv) == 2
    err = capsys.readouterr().err
    assert match in err, err
    if out is not None:
        assert not Path(out).exists()
        assert not [p for p in Path(out).parent.iterdir() if ".partial-" in p.name]


def test_bad_inputs(tiny_dir, text_file, tmp_path, capsys):
    model = tiny_dir("llama")
    out = tmp_path / "o"
    _fails(capsys, _args(tmp_path / "missing", text_file, out), "model not found", out)
    _fails(capsys, _args(model, text_file, out, "--bits", "9"), "--bits must be", out)
    _fails(capsys, _args(model, text_file, out, "--bits", "0"), "--bits must be", out)
    _fails(capsys, _args(model, text_file, out, "--group-size", "0"), "--group-size must be", out)
    _fails(capsys, _args(model, tmp_path / "nocalib.txt", out), "not found", out)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _fails(capsys, _args(model, empty, out), "is empty", out)
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    _fails(capsys, _args(model, short, out), "shorter than one window", out)
    # unsupported architecture
    weird = tmp_path / "weird"
    weird.mkdir()
    for f in model.iterdir():
        (weird / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((weird / "config.json").read_text())
    cfg["model_type"] = "t5"
    (weird / "config.json").write_text(json.dumps(cfg))
    _fails(capsys, _args(weird, text_file, out), "unsupported architecture", out)
    # corrupt and truncated safetensors
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in model.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    st = bad / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    _fails(capsys, _args(bad, text_file, out), "truncated safetensors file", out)
    st.write_bytes(b"\x00garbage" * 10)
    _fails(capsys, _args(bad, text_file, out), "safetensors file", out)
    # existing output directory
    out.mkdir()
    _fails(capsys, _args(model, text_file, out), "already exists")
    assert not any(out.iterdir())


def test_interrupted_run_leaves_nothing(tiny_dir, text_file, tmp_path, monkeypatch, capsys):
    from lowbit.passes.methods import gptq

    calls = {"n": 0}
    orig = gptq.GPTQ.calibrate_block

    def interrupt(self, ctx):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return orig(self, ctx)

    monkeypatch.setattr(gptq.GPTQ, "calibrate_block", interrupt)
    out = tmp_path / "o"
    assert compile_main(_args(tiny_dir("llama"), text_file, out)) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_and_rtn_runs(tiny_dir, text_file, tmp_path):
    out = tmp_path / "o"
    argv = [str(tiny_dir("qwen2")), "--method", "rtn", "--bits", "3", "--group-size", "24", "--calib", str(text_file),
            "--nsamples", "2", "--seqlen", "32", "-o", str(out), "-q"]
    assert compile_main(argv) == 0
    (out / "stale").write_text("x")  # lowbit's own output (foreign folders are refused: test_trust.py)
    assert compile_main([*argv, "--overwrite"]) == 0
    assert not (out / "stale").exists()
    a = load(out)
    assert all(f.bits == 3 for f in a.formats.values())
    assert a(torch.randint(0, 256, (2, 9))).shape == (2, 9, 260)


def test_billm_artifact_round_trip(tiny_dir, text_file, tmp_path):
    out = tmp_path / "b"
    assert compile_main([str(tiny_dir("llama")), "--method", "billm", "--billm-block-size", "32", "--calib",
                         str(text_file), "--nsamples", "4", "--seqlen", "64", "-o", str(out), "-q",
                         "--float-dtype", "float32"]) == 0
    a = load(out)
    man = json.loads((out / "manifest.json").read_text())
    assert {m["format"]["kind"] for m in man["modules"].values()} == {"binary_residual"}
    rep = json.loads((out / "report.json").read_text())
    s = rep["summary"]
    # The packed file holds exactly the format tensors: 8-byte length + JSON header + tensor bytes.
    with open(out / "packed.safetensors", "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    assert s["packed_file_bytes"] == 8 + header + s["linears_packed_bytes"]
    assert 1.0 < s["code_bits_per_weight"] < s["bits_per_weight"]
    ids = torch.randint(0, 256, (1, 30))
    code = ("import sys, torch; from lowbit.runtime import load; a = load(sys.argv[1]); "
            "torch.save(a(torch.load(sys.argv[2])), sys.argv[3])")
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "o.pt")], check=True)
    torch.testing.assert_close(torch.load(tmp_path / "o.pt"), a(ids), rtol=0, atol=0)


def test_method_refuses_foreign_flags(tiny_dir, text_file, tmp_path, capsys):
    _fails(capsys, [str(tiny_dir("llama")), "--method", "billm", "--bits", "2", "--calib", str(text_file),
                    "-o", str(tmp_path / "x")], "does not take", tmp_path / "x")
