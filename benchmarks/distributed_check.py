"""One process vs ``torchrun --nproc-per-node N``: the same Hessians, the same artifact quality, the wall times.

Runs ``lowbit-compile`` twice with ``LOWBIT_DUMP_HESSIANS`` (each block's Hessians after the all-reduce), once
plainly and once under torchrun (gloo on CPU), then prints the largest relative difference of any Hessian
(``max|H1 - HN| / max|H1|`` per matrix), the share of packed bytes that differ, the two WikiText-2 perplexities
(when ``--eval wikitext2`` is among the compile arguments) and the two wall times.

Usage:
  python benchmarks/distributed_check.py MODEL --nproc 2 -- --method gptq --bits 4 --group-size 128 \\
      --nsamples 32 --seqlen 512 --eval wikitext2 --eval-windows 8
  a training method (gradients summed over the ranks; batches of >= N windows keep every rank busy):
  python benchmarks/distributed_check.py MODEL --nproc 2 -- --method efficientqat --phases block-ap \
      --eqat-batch-size 2 --nsamples 32 --seqlen 512 --eval wikitext2 --eval-windows 8
Outputs go to out/distributed-check/{one,torchrun}/ (artifacts) and .../hessians-{one,torchrun}/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def compare_hessians(a: Path, b: Path) -> tuple[float, int]:
    """(largest relative difference over every Hessian, how many were compared)."""
    from safetensors.torch import load_file

    worst, n = 0.0, 0
    for f in sorted(a.glob("*.safetensors")):
        ha, hb = load_file(str(f)), load_file(str(b / f.name))
        if set(ha) != set(hb):
            raise SystemExit(f"{f.name}: different Hessians in the two runs: {sorted(set(ha) ^ set(hb))}")
        for k in ha:
            worst = max(worst, float((ha[k] - hb[k]).abs().max() / ha[k].abs().max().clamp_min(1e-30)))
            n += 1
    return worst, n  # n == 0: the method accumulates none (ApiQ)


def differing_bytes(a: Path, b: Path) -> float:
    x, y = a.read_bytes(), b.read_bytes()
    if len(x) != len(y):
        return 1.0
    return sum(p != q for p, q in zip(x, y)) / max(len(x), 1)


def run(cmd: list, env: dict) -> float:
    print("[distributed-check] " + " ".join(cmd), file=sys.stderr)
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--out", default="out/distributed-check")
    argv = sys.argv[1:]
    rest = argv[argv.index("--") + 1 :] if "--" in argv else []
    a = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    a.compile_args = rest
    out = Path(a.out)
    bindir = Path(sys.executable).parent  # the environment lowbit is installed in (run with its python)
    exe = str(bindir / "lowbit-compile")
    walls = {}
    for tag in ("one", "torchrun"):
        env = dict(os.environ, LOWBIT_DUMP_HESSIANS=str(out / f"hessians-{tag}"))
        cmd = [exe, a.model, *a.compile_args, "-o", str(out / tag), "--overwrite", "-q"]
        if tag == "torchrun":
            cmd = [str(bindir / "torchrun"), "--standalone", "--nproc-per-node", str(a.nproc), *cmd]
            env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
        walls[tag] = run(cmd, env)
    worst, n = compare_hessians(out / "hessians-one", out / "hessians-torchrun")
    diff = differing_bytes(out / "one" / "packed.safetensors", out / "torchrun" / "packed.safetensors")
    print(f"Hessians: {n} compared, largest relative difference {worst:.2e}" if n else "Hessians: none (the method "
          "accumulates none)")
    print(f"packed bytes differing: {100 * diff:.3f}%")
    ppls = {}
    for tag in ("one", "torchrun"):
        rep = json.loads((out / tag / "report.json").read_text())
        ppl = ppls[tag] = {k: v["after"]["ppl"] for k, v in rep.get("eval", {}).items() if "after" in v}
        ws = json.loads((out / tag / "manifest.json").read_text())["calibration_run"]["world_size"]
        print(f"{tag}: world_size {ws}, wall {walls[tag]:.0f}s, calibrate {rep['times']['calibrate']:.0f}s, "
              f"perplexity {ppl}")
    for k in ppls["one"]:
        if k in ppls["torchrun"]:
            print(f"{k}: torchrun perplexity {100 * (ppls['torchrun'][k] / ppls['one'][k] - 1):+.3f}% vs one process")
    return 0


if __name__ == "__main__":
    sys.exit(main())
