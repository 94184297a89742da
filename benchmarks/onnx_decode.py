"""Whole-model decode in ONNX Runtime: tokens/s and peak resident memory, float ONNX vs exported formats.

Each model runs in its own process (peak RSS = that process's own VmHWM, i.e. runtime + weights + cache; the
runner imports no torch). "weights" = what the loaded model holds: the process's RSS after loading and a 12-token
warm-up (every kernel run once, so ``MatMulNBits`` weights are pre-packed) minus its RSS before the session was
created, less library pages as below: the weights as ONNX Runtime holds them plus the session's own structures, the
figure to compare with the artifact's packed bytes. "resident" = what the model holds while it decodes: the
process's RSS after the decode runs minus its RSS before the session was created (Python, numpy, ONNX Runtime
imported), less the pages of shared libraries mapped in meanwhile (ONNX Runtime's own kernel code, paged in when
a kernel first runs: the runtime's baseline, not the model's; from ``/proc/self/smaps``). It includes the weights
as ONNX Runtime holds them (pre-packed ``MatMulNBits`` blocks, memory-mapped float tensors' touched pages), the
key/value cache and the arena's activations. "peak - before" (the previous definition: VmHWM minus RSS before the
session, library pages and load-time transients included) is printed too.

The float32 baseline is the uncompressed model as the same directly built graph (fused ORT ops, float
MatMul weights, q/k/v and gate/up merged the same way; ``--float-dir``, default out/float-onnx-direct);
``--traced-float`` adds the torch.export float decoder (out/float-onnx) as a second reference row.
Prefill a prompt of --prompt-len tokens, then decode --new-tokens greedily one token per step with the
KV cache; the figure is decode tokens/s. Speed ratios: this shared machine's speed drifts by +-30% within
minutes, so each model runs in one process with the float32 decoder, their decode runs alternating (float,
model, model, float, ...; ``--pairs``), and the ratio is the median of the pairs' ratios.

Usage:
  python benchmarks/onnx_decode.py --float smollm2-135m ART_DIR [ART_DIR ...]   # ART_DIR/onnx must exist
  (the float decoder is exported once into --float-dir, default out/float-onnx)
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def child(onnx_dir: str, prompt_len: int, new_tokens: int, threads: int | None, repeat: int = 3) -> None:
    import numpy as np
    import onnxruntime  # noqa: F401  (the runtime's own baseline includes its library)
    from lowbit.runtime.onnx_runtime import OrtDecoder
    from lowbit.runtime.resources import peak_rss_mib, rss_mib

    base, base_lib = rss_mib(), _library_rss_mib()
    dec = OrtDecoder(onnx_dir, threads=threads)
    ids = list(np.random.default_rng(0).integers(100, 5000, prompt_len))
    dec.generate(ids[:8], 4)  # warm-up: every kernel has run once (weights pre-packed, their code paged in)
    weights = (rss_mib() - base) - (_library_rss_mib() - base_lib)  # + a 12-token cache and the arena's first use
    runs = []
    for _ in range(repeat):  # the median of several runs: this shared 2-core machine's speed drifts by +-30%
        out, t_pre, t_dec = dec.generate(ids, new_tokens)
        runs.append(((len(out) - 1) / t_dec, t_pre))
    runs.sort()
    tok_s, t_pre = runs[len(runs) // 2]
    rss = peak_rss_mib()
    resident = (rss_mib() - base) - (_library_rss_mib() - base_lib)
    print(json.dumps({"tok_s": tok_s, "prefill_s": t_pre, "peak_rss_mib": rss, "runtime_mib": base,
                      "resident_mib": resident, "weights_mib": weights, "runs_tok_s": [r[0] for r in runs]}))


def _library_rss_mib() -> float:
    """Resident pages of this process's shared-library mappings (``*.so``), MiB, from ``/proc/self/smaps``."""
    total, lib = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 6)
            if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # a mapping's header line
                path = head[5].strip() if len(head) > 5 else ""
                lib = ".so" in Path(path).name
            elif lib and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total / 1024


def paired(float_dir: str, onnx_dir: str, prompt_len: int, new_tokens: int, threads: int | None, pairs: int) -> None:
    """Speed only: the float32 decoder and the model in one process, their runs alternating (float, model, model,
    float, ...), so both see the same machine; prints the per-pair ratios. (Memory comes from :func:`child`.)"""
    import numpy as np
    from lowbit.runtime.onnx_runtime import OrtDecoder

    decs = [OrtDecoder(float_dir, threads=threads), OrtDecoder(onnx_dir, threads=threads)]
    ids = list(np.random.default_rng(0).integers(100, 5000, prompt_len))
    for d in decs:
        d.generate(ids[:8], 4)  # warm-up
    tok = [[], []]
    for i in range(pairs):
        for j in ((0, 1) if i % 2 == 0 else (1, 0)):
            out, _, t_dec = decs[j].generate(ids, new_tokens)
            tok[j].append((len(out) - 1) / t_dec)
    print(json.dumps({"float_tok_s": tok[0], "tok_s": tok[1], "ratios": [m / f for f, m in zip(*tok)]}))


def _run(args: list) -> dict:
    r = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def onnx_bytes(d: Path) -> tuple[int, int | None]:
    """(decoder file bytes, packed weight bytes of the artifact's formats or None)."""
    meta = json.loads((d / "export.json").read_text())
    f = meta["graphs"]["decoder"]
    return (sum((d / x).stat().st_size for x in (f, f + ".data") if (d / x).exists()),
            meta.get("decoder", {}).get("packed_bytes"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs="*")
    ap.add_argument("--float", dest="float_model", default="smollm2-135m")
    ap.add_argument("--float-dir", default="out/float-onnx-direct")
    ap.add_argument("--traced-float", default=None, metavar="DIR",
                    help="also time the torch.export float decoder (exported into DIR if missing)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=1, help="decode runs in each model's memory process")
    ap.add_argument("--pairs", type=int, default=6, help="alternating float/model decode runs per model (speed)")
    ap.add_argument("--child", default=None)
    ap.add_argument("--paired", nargs=2, default=None, metavar=("FLOAT_DIR", "ONNX_DIR"))
    a = ap.parse_args()
    common = ["--prompt-len", str(a.prompt_len), "--new-tokens", str(a.new_tokens)] + \
        (["--threads", str(a.threads)] if a.threads else [])
    if a.child:
        return child(a.child, a.prompt_len, a.new_tokens, a.threads, a.repeat)
    if a.paired:
        return paired(*a.paired, a.prompt_len, a.new_tokens, a.threads, a.pairs)
    fdir = Path(a.float_dir)
    if not (fdir / "export.json").exists():
        export_float(a.float_model, fdir, direct=True)
    rows = [("float32 ONNX (direct)", fdir)]
    if a.traced_float:
        if not (Path(a.traced_float) / "export.json").exists():
            export_float(a.float_model, Path(a.traced_float), direct=False)
        rows.append(("float32 ONNX (traced)", Path(a.traced_float)))
    rows += [(Path(x).name, Path(x) / "onnx") for x in a.artifacts]
    # Memory: each model alone in its own process (its own VmHWM). Speed: this shared machine's speed drifts by
    # +-30% within minutes, so each model's ratio comes from one process that alternates float and model runs.
    res = []
    float_tok = []
    for name, d in rows:
        r = _run(["--child", str(d), "--repeat", str(a.repeat), *common])
        r["bytes"], r["packed"] = onnx_bytes(d)
        if d != fdir:
            p = _run(["--paired", str(fdir), str(d), "--pairs", str(a.pairs), *common])
            r["ratio"], r["tok_s"], r["ratios"] = _median(p["ratios"]), _median(p["tok_s"]), p["ratios"]
            float_tok += p["float_tok_s"]
        print(f"{name}: {r}", file=sys.stderr)
        res.append((name, r))
    base = res[0][1]
    base["ratio"] = 1.0
    base["tok_s"] = _median(float_tok) if float_tok else base["tok_s"]
    print(f"\nDecode in ONNX Runtime {__import__('onnxruntime').__version__}, {a.threads or os.cpu_count()} thread(s), "
          f"prompt {a.prompt_len}, {a.new_tokens} new tokens (greedy, KV cache); speed: median of {a.pairs} "
          f"alternating float/model runs in one process\n")
    print("| model | decoder.onnx + data | decode tok/s | speed vs float | peak RSS MiB | RSS vs float | "
          "weights MiB | resident MiB | peak - before MiB | packed MiB | weights / packed | resident / packed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in res:
        packed = r["packed"] / 2**20 if r["packed"] else None
        print(f"| {name} | {r['bytes'] / 2**20:.1f} MiB | {r['tok_s']:.1f} | {r['ratio']:.2f}x | "
              f"{r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] / base['peak_rss_mib']:.2f} | {r['weights_mib']:.0f} | "
              f"{r['resident_mib']:.0f} | {r['peak_rss_mib'] - r['runtime_mib']:.0f} | "
              + (f"{packed:.1f} | {r['weights_mib'] / packed:.2f} | {r['resident_mib'] / packed:.2f} |"
                 if packed else "- | - | - |"))


def export_float(model: str, out: Path, direct: bool) -> None:
    print(f"exporting the float32 decoder of {model} to {out} ({'direct' if direct else 'traced'}) ...",
          file=sys.stderr)
    if not direct:
        from lowbit.compiler.lowering.onnx_decoder import export_float_decoder

        export_float_decoder(model, out)
        return
    from lowbit.compiler.engine import models
    from lowbit.compiler.lowering.onnx_llama import build_float_decoder

    m, _, _ = models.load(model)
    out.mkdir(parents=True, exist_ok=True)
    info = build_float_decoder(m.eval(), out / "decoder.onnx")
    (out / "export.json").write_text(json.dumps({"graphs": {"decoder": "decoder.onnx"}, "cache": info["cache"],
                                                 "float": True, "decoder": {"builder": info["builder"]}}))


if __name__ == "__main__":
    main()
