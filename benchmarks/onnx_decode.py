"""Whole-model decode in ONNX Runtime: tokens/s and peak resident memory, float ONNX vs exported formats.

Each model runs in its own process (peak RSS = that process's own VmHWM, i.e. runtime + weights + cache).
Prefill a prompt of --prompt-len tokens, then decode --new-tokens greedily one token per step with the
KV cache; the figure is decode tokens/s. Ratios are against the float32 ONNX model measured in the same run.

Usage:
  python benchmarks/onnx_decode.py --float smollm2-135m ART_DIR [ART_DIR ...]   # ART_DIR/onnx must exist
  (the float decoder is exported once into --float-dir, default out/float-onnx)
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def child(onnx_dir: str, prompt_len: int, new_tokens: int, threads: int | None) -> None:
    import numpy as np

    from lowbit.runtime.onnx_runtime import OrtDecoder

    dec = OrtDecoder(onnx_dir, threads=threads)
    ids = list(np.random.default_rng(0).integers(100, 5000, prompt_len))
    dec.generate(ids[:8], 4)  # warm-up
    out, t_pre, t_dec = dec.generate(ids, new_tokens)
    rss = peak_rss_mib()
    print(json.dumps({"tok_s": (len(out) - 1) / t_dec, "prefill_s": t_pre, "peak_rss_mib": rss}))


def peak_rss_mib() -> float:
    """This process's own peak resident memory: ``VmHWM`` (``ru_maxrss`` carries a parent's peak across fork and
    exec on Linux, so a child launched after the float export would report the exporter's peak)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def onnx_bytes(d: Path) -> int:
    meta = json.loads((d / "export.json").read_text())
    f = meta["graphs"]["decoder"]
    return sum((d / x).stat().st_size for x in (f, f + ".data") if (d / x).exists())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs="*")
    ap.add_argument("--float", dest="float_model", default="smollm2-135m")
    ap.add_argument("--float-dir", default="out/float-onnx")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.prompt_len, a.new_tokens, a.threads)
    fdir = Path(a.float_dir)
    if not (fdir / "export.json").exists():
        from lowbit.compiler.lowering.onnx_decoder import export_float_decoder

        print(f"exporting the float32 decoder of {a.float_model} to {fdir} ...", file=sys.stderr)
        export_float_decoder(a.float_model, fdir)
    rows = [("float32 ONNX", fdir)] + [(Path(x).name, Path(x) / "onnx") for x in a.artifacts]
    res = []
    for name, d in rows:
        cmd = [sys.executable, __file__, "--child", str(d), "--prompt-len", str(a.prompt_len),
               "--new-tokens", str(a.new_tokens)] + (["--threads", str(a.threads)] if a.threads else [])
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        r["bytes"] = onnx_bytes(d)
        res.append((name, r))
        print(f"done {name}: {r}", file=sys.stderr)
    base = res[0][1]
    print(f"\nDecode in ONNX Runtime {__import__('onnxruntime').__version__}, {os.cpu_count()} CPU threads, "
          f"prompt {a.prompt_len}, {a.new_tokens} new tokens (greedy, KV cache)\n")
    print("| model | decoder.onnx + data | size vs float | decode tok/s | speed vs float | peak RSS MiB | RSS vs float |")
    print("|---|---|---|---|---|---|---|")
    for name, r in res:
        print(f"| {name} | {r['bytes'] / 2**20:.1f} MiB | {r['bytes'] / base['bytes']:.2f} | {r['tok_s']:.1f} | "
              f"{r['tok_s'] / base['tok_s']:.2f}x | {r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] / base['peak_rss_mib']:.2f} |")


if __name__ == "__main__":
    main()
