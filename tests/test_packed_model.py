"""An artifact as an eager model on any device (compiler/engine/packed_model.py): same logits as the artifact's
program for every format (biases, low-rank branches, outlier columns included); the packed tensors keep
their dtypes under ``.to(dtype)``; the kernel benchmark's CPU smoke mode runs end to end on one."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowbit.compiler.frontend.cli import compile_main
from lowbit.runtime.modules import PackedLinear
from lowbit.compiler.engine.packed_model import packed_model
from lowbit.runtime.artifact import load

ROOT = Path(__file__).resolve().parents[1]


def _compile(tiny_dir, text_file, out, arch, *method):
    argv = [str(tiny_dir(arch)), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32", "-q",
            "--float-dtype", "float32", "-o", str(out), *method]
    assert compile_main(argv) == 0
    return out


@pytest.mark.parametrize("arch,method", [
    ("qwen2", ["--method", "rtn", "--bits", "3", "--group-size", "16"]),  # q/k/v biases
    ("llama", ["--method", "billm"]),
    ("llama", ["--method", "apiq", "--bits", "2", "--group-size", "16", "--lora-rank", "4", "--apiq-epochs", "1"]),
], ids=["rtn-bias", "billm", "apiq-lora"])
def test_packed_model_matches_the_artifact(tiny_dir, text_file, tmp_path, arch, method):
    art = load(_compile(tiny_dir, text_file, tmp_path / "a", arch, *method))
    model = packed_model(art)
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == len(art.formats) > 0
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, art(ids), rtol=1e-4, atol=1e-4)
    half = packed_model(art, dtype=torch.float16)
    for m in half.modules():
        if isinstance(m, PackedLinear):
            stored = art.formats[next(n for n, mm in half.named_modules() if mm is m)].tensors()
            assert all(getattr(m, k).dtype == v.dtype for k, v in stored.items())
    assert half.get_input_embeddings().weight.dtype == torch.float16


def test_kernel_benchmark_smoke_mode(tiny_dir, text_file, tmp_path):
    art = _compile(tiny_dir, text_file, tmp_path / "a", "llama", "--method", "rtn", "--bits", "4", "--group-size", "32")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "triton_kernels.py"), "--smoke", "--artifact",
                        str(art)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| 40x96 | 16 |" in r.stdout and "vq d4b8g128" in r.stdout
    diff = float(r.stdout.split("largest kernel-vs-eager difference (relative to max |output|): ")[1].split()[0])
    assert diff < 5e-3  # fp16 activations against the eager fp16 product
    assert "whole-model greedy decode" in r.stdout
