"""``torchrun --nproc-per-node 2 lowbit-compile``: gloo on CPU, the one-process Hessians and artifact, and a
rank that dies leaving nothing behind."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

BIN = Path(sys.executable).parent


def _run(args, env_extra=None, nproc=1, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    cmd = [str(BIN / "lowbit-compile"), *args]
    if nproc > 1:
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(nproc), *cmd]  # a free port
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _args(tiny_dir, text_file, out):
    return [str(tiny_dir("llama")), "--method", "gptq", "--bits", "3", "--group-size", "32", "--calib",
            str(text_file), "--nsamples", "6", "--seqlen", "64", "-o", str(out), "-q"]


def test_two_processes_give_the_one_process_hessians_and_artifact(tiny_dir, text_file, tmp_path):
    one = _run(_args(tiny_dir, text_file, tmp_path / "one"), {"LOWBIT_DUMP_HESSIANS": str(tmp_path / "h1")})
    assert one.returncode == 0, one.stderr[-2000:]
    two = _run(_args(tiny_dir, text_file, tmp_path / "two"), {"LOWBIT_DUMP_HESSIANS": str(tmp_path / "h2")}, nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path / "h1").glob("*.safetensors"))
    assert files == sorted(p.name for p in (tmp_path / "h2").glob("*.safetensors")) and len(files) == 2
    for f in files:
        a, b = load_file(str(tmp_path / "h1" / f)), load_file(str(tmp_path / "h2" / f))
        assert set(a) == set(b)
        for k in a:
            assert float((a[k] - b[k]).abs().max() / a[k].abs().max()) <= 1e-5, (f, k)
    packed = [(tmp_path / d / "packed.safetensors").read_bytes() for d in ("one", "two")]
    assert packed[0] == packed[1]  # the same Hessians, the same GPTQ decisions
    layers = json.loads((tmp_path / "two" / "report.json").read_text())["layers"]
    assert {v["solved_by_rank"] for v in layers.values()} == {0, 1}  # the solves were shared out, not repeated
    man = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert man["calibration_run"]["world_size"] == 2
    assert man["calibration"]["world_size"] == 2
    assert json.loads((tmp_path / "one" / "manifest.json").read_text())["calibration_run"]["world_size"] == 1


def test_a_rank_that_dies_leaves_nothing(tiny_dir, text_file, tmp_path):
    # rank 1 raises inside calibration (injected through sitecustomize, loaded by every Python the test starts)
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    from lowbit.compiler.engine import calibrate\n"
        "    def boom(self):\n"
        "        raise RuntimeError('injected failure on rank 1')\n"
        "    calibrate.Engine.run = boom\n")
    env = {"PYTHONPATH": os.pathsep.join([str(inject), os.environ.get("PYTHONPATH", "")])}
    r = _run(_args(tiny_dir, text_file, tmp_path / "out"), env, nproc=2)
    assert r.returncode != 0
    assert "injected failure on rank 1" in r.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name not in ("inject",) and not p.name.endswith(".lock")] == []


def test_more_processes_than_windows_is_refused(tiny_dir, text_file, tmp_path):
    args = _args(tiny_dir, text_file, tmp_path / "o")
    args[args.index("--nsamples") + 1] = "1"
    r = _run(args, nproc=2)
    assert r.returncode != 0
    assert "1 calibration windows for 2 processes" in r.stderr
    assert not (tmp_path / "o").exists()


def _weights(d):
    """Dequantized weight of every linear of an artifact, by name."""
    from lowbit.runtime import artifact

    return {n: f.dequantize() for n, f in artifact.load(d).formats.items()}


@pytest.mark.parametrize("method", [
    ["--method", "apiq", "--apiq-epochs", "2", "--apiq-batch-size", "2", "--lora-rank", "4"],
    pytest.param(["--method", "efficientqat", "--bits", "2", "--group-size", "32", "--phases", "block-ap",
                  "--eqat-epochs", "2", "--eqat-batch-size", "2", "--eqat-val-windows", "2"],
                 marks=pytest.mark.slow),  # the same helper as ApiQ's (data_parallel.py); kept out of the default time
], ids=["apiq", "efficientqat"])
def test_training_methods_sum_gradients_over_ranks(tiny_dir, text_file, tmp_path, method):
    # the one-process batches on both ranks, each computing its windows' part, gradients summed: the same steps
    # as one process up to float summation order (and the windows really were split: each rank logs its half)
    args = [str(tiny_dir("llama")), *method, "--calib", str(text_file), "--nsamples", "6", "--seqlen", "64", "-q"]
    one = _run(args + ["-o", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-2000:]
    two = _run(args + ["-o", str(tmp_path / "two")], nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert set(a) == set(b) and a
    for n in a:
        diff = (a[n] - b[n]).abs()
        # an element may land on the other side of a rounding boundary; the rest agree to float noise
        assert float((diff > 1e-4 * a[n].abs().max()).float().mean()) < 0.01, n
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["calibration_run"]["world_size"] == 2


@pytest.mark.slow  # ~75 s of three processes; the shared-out Hessian solves are in the default suite (GPTQ above)
def test_reallm_search_shared_out_gives_the_one_process_artifact(tiny_dir, text_file, tmp_path):
    # the candidate search and the final decompositions split by linear, proxy errors summed, formats broadcast
    args = [str(tiny_dir("llama")), "--method", "reallm", "--bits-budget", "4.5", "--reallm-candidates",
            "d2b5g32r0,d2b6g32r0,d4b8g32r0,d2b5g32r4", "--reallm-kmeans-iters", "3", "--reallm-lq-iters", "1",
            "--calib", str(text_file), "--nsamples", "6", "--seqlen", "64", "-q"]
    one = _run(args + ["-o", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-2000:]
    two = _run(args + ["-o", str(tmp_path / "two")], nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    packed = [(tmp_path / d / "packed.safetensors").read_bytes() for d in ("one", "two")]
    assert packed[0] == packed[1]
    layers = json.loads((tmp_path / "two" / "report.json").read_text())["layers"]
    assert {v["solved_by_rank"] for v in layers.values()} == {0, 1}
