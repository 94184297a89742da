"""Whole-model decode in ONNX Runtime: tokens/s and peak resident memory, float ONNX vs exported formats.

Each model runs in its own process (peak RSS = that process's own VmHWM, i.e. runtime + weights + cache; the
runner imports no torch). "resident weights" = peak RSS minus the same process's RSS before the session was
created (Python, numpy, ONNX Runtime), against the artifact's packed bytes (``export.json``).

The float32 baseline is the uncompressed model as the same directly built graph (fused ORT ops, float
MatMul weights; ``--float-dir``, default out/float-onnx-direct); ``--traced-float`` adds the torch.export
float decoder (out/float-onnx) as a second reference row.
Prefill a prompt of --prompt-len tokens, then decode --new-tokens greedily one token per step with the
KV cache; the figure is decode tokens/s. Ratios are against the float32 ONNX model measured in the same run.

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

    base = rss_mib()
    dec = OrtDecoder(onnx_dir, threads=threads)
    ids = list(np.random.default_rng(0).integers(100, 5000, prompt_len))
    dec.generate(ids[:8], 4)  # warm-up
    runs = []
    for _ in range(repeat):  # the median of several runs: this shared 2-core machine's speed drifts by +-30%
        out, t_pre, t_dec = dec.generate(ids, new_tokens)
        runs.append(((len(out) - 1) / t_dec, t_pre))
    runs.sort()
    tok_s, t_pre = runs[len(runs) // 2]
    rss = peak_rss_mib()
    print(json.dumps({"tok_s": tok_s, "prefill_s": t_pre, "peak_rss_mib": rss, "runtime_mib": base,
                      "runs_tok_s": [r[0] for r in runs]}))


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
    ap.add_argument("--repeat", type=int, default=3, help="decode runs per model and round; their median counts")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all models (ratios: median over rounds)")
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.prompt_len, a.new_tokens, a.threads, a.repeat)
    fdir = Path(a.float_dir)
    if not (fdir / "export.json").exists():
        export_float(a.float_model, fdir, direct=True)
    rows = [("float32 ONNX (direct)", fdir)]
    if a.traced_float:
        if not (Path(a.traced_float) / "export.json").exists():
            export_float(a.float_model, Path(a.traced_float), direct=False)
        rows.append(("float32 ONNX (traced)", Path(a.traced_float)))
    rows += [(Path(x).name, Path(x) / "onnx") for x in a.artifacts]
    # Rounds: every model once per round, in turn, so that each ratio compares runs minutes apart at most
    # (this shared machine's speed drifts); the table gives each model's median over rounds of (tok/s / float's
    # tok/s in the same round).
    per_round = []
    for rnd in range(a.rounds):
        got = {}
        for name, d in rows:
            cmd = [sys.executable, __file__, "--child", str(d), "--prompt-len", str(a.prompt_len),
                   "--new-tokens", str(a.new_tokens), "--repeat", str(a.repeat)] + \
                (["--threads", str(a.threads)] if a.threads else [])
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
                           .splitlines()[-1])
            r["bytes"], r["packed"] = onnx_bytes(d)
            got[name] = r
            print(f"round {rnd + 1} {name}: {r}", file=sys.stderr)
        per_round.append(got)
    res = []
    for name, _ in rows:
        rs = [p[name] for p in per_round]
        ratios = sorted(p[name]["tok_s"] / p[rows[0][0]]["tok_s"] for p in per_round)
        r = dict(rs[0])
        r["tok_s"] = sorted(x["tok_s"] for x in rs)[len(rs) // 2]
        r["ratio"] = ratios[len(ratios) // 2]
        r["peak_rss_mib"] = max(x["peak_rss_mib"] for x in rs)
        r["runtime_mib"] = min(x["runtime_mib"] for x in rs)
        res.append((name, r))
    base = res[0][1]
    print(f"\nDecode in ONNX Runtime {__import__('onnxruntime').__version__}, {a.threads or os.cpu_count()} thread(s), "
          f"prompt {a.prompt_len}, {a.new_tokens} new tokens (greedy, KV cache), median of {a.rounds} rounds x "
          f"{a.repeat} runs\n")
    print("| model | decoder.onnx + data | decode tok/s | speed vs float (median of same-round ratios) | peak RSS MiB | RSS vs float | "
          "resident weights MiB | packed MiB | resident / packed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in res:
        weights = r["peak_rss_mib"] - r["runtime_mib"]
        packed = r["packed"] / 2**20 if r["packed"] else None
        print(f"| {name} | {r['bytes'] / 2**20:.1f} MiB | {r['tok_s']:.1f} | {r['ratio']:.2f}x | "
              f"{r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] / base['peak_rss_mib']:.2f} | {weights:.0f} | "
              + (f"{packed:.1f} | {weights / packed:.2f} |" if packed else "- | - |"))


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
