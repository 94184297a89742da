"""The same compile on several calibration devices (``--device``), side by side: time, memory, agreement.

Runs ``lowbit-compile MODEL ARGS --device D`` once per device (a child process each, in the order given; the first
is the baseline), then prints for each: wall time, the calibration stage, the mean time per block, the process's
peak RSS (its ``VmHWM``), the GPU's peak allocation, the WikiText-2 perplexity when ``--eval wikitext2`` is among the
arguments, the speed-up of the calibration stage over the baseline, and the share of packed bytes that differ from
the baseline's artifact (a GPU's float rounding differs from the CPU's, so GPTQ may pick other codes for a few
weights; RTN is expected to be identical).

Usage:
  python benchmarks/device_compare.py MODEL --devices cpu,cuda -- --method gptq --bits 4 --group-size 128 \\
      --nsamples 128 --seqlen 512
  python benchmarks/device_compare.py MODEL --devices cpu,cuda,cuda@bfloat16 -- ...   # DEVICE@COMPUTE_DTYPE
Artifacts go to out/device-compare/<device>[-<dtype>]/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def differing_bytes(a: Path, b: Path) -> float:
    x, y = a.read_bytes(), b.read_bytes()
    if len(x) != len(y):
        return 1.0
    import numpy as np

    return float((np.frombuffer(x, np.uint8) != np.frombuffer(y, np.uint8)).mean())


def compile_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "lowbit-compile"
    if exe.exists():
        return [str(exe)]
    # lowbit importable but not installed (PYTHONPATH): the same entry point
    return [sys.executable, "-c", "import sys; from lowbit.compiler.frontend.cli import compile_main; "
                                  "sys.exit(compile_main(sys.argv[1:]))"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--devices", default="cpu,cuda", help="comma-separated DEVICE or DEVICE@COMPUTE_DTYPE; the "
                                                          "first is the baseline")
    ap.add_argument("--out", default="out/device-compare")
    argv = sys.argv[1:]
    rest = argv[argv.index("--") + 1 :] if "--" in argv else []
    a = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    out = Path(a.out)
    rows = []
    for spec in a.devices.split(","):
        dev, _, dtype = spec.partition("@")
        tag = dev.replace(":", "") + (f"-{dtype}" if dtype else "")
        cmd = [*compile_cmd(), a.model, *rest, "--device", dev, "-o", str(out / tag), "--overwrite", "-q"]
        if dtype:
            cmd += ["--compute-dtype", dtype]
        print("[device-compare] " + " ".join(cmd), file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd).returncode
        wall = time.perf_counter() - t0
        if rc:
            print(f"[device-compare] {spec}: compile failed (exit {rc}) after {wall:.0f}s", file=sys.stderr)
            rows.append((spec, None, wall, None))
            continue
        rep = json.loads((out / tag / "report.json").read_text())
        rows.append((spec, rep, wall, out / tag))
    base = next((r for r in rows if r[1] is not None), None)
    print(f"\n{'device':16s} {'wall s':>8s} {'calib s':>8s} {'s/block':>8s} {'RSS GiB':>8s} {'GPU GiB':>8s} "
          f"{'ppl':>9s} {'calib x':>8s} {'bytes != base':>14s}")
    for spec, rep, wall, path in rows:
        if rep is None:
            print(f"{spec:16s} {wall:8.0f}  failed")
            continue
        res = rep.get("resources", {})
        blocks = res.get("block_seconds") or [float("nan")]
        calib = rep["times"].get("calibrate", float("nan"))
        ppl = next((v["after"]["ppl"] for v in rep.get("eval", {}).values() if "after" in v), float("nan"))
        speed = base[1]["times"]["calibrate"] / calib if calib else float("nan")
        diff = differing_bytes(base[3] / "packed.safetensors", path / "packed.safetensors")
        gpu = res.get("device_peak_mib")
        print(f"{spec:16s} {wall:8.0f} {calib:8.1f} {sum(blocks) / len(blocks):8.2f} "
              f"{res.get('peak_rss_mib', float('nan')) / 1024:8.2f} {(gpu or float('nan')) / 1024:8.2f} "
              f"{ppl:9.3f} {speed:8.2f} {100 * diff:13.3f}%")
    if shutil.which("nvidia-smi"):
        subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    return 0 if all(r[1] is not None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
