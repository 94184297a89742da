"""WikiText-2 perplexity of an exported artifact in ONNX Runtime vs the torch reference on the same artifact.

Same windows as lowbit-compile's evaluation (first --windows windows of --seqlen tokens). The torch figure is
the artifact's own report (computed by lowbit-compile from the same program) unless --torch recomputes it.

``--graph decoder`` (default) scores the deployed decoder (``decoder.onnx``, one full window per call with an empty
cache), ``--graph decode`` the same decoder one token per call with its key/value cache (generation's path: lowbit's
kernels take their GEMV there, with int8 activations for BiLLM at accuracy_level 4, and a tile path for whole
windows; ~2048 calls per window), ``--graph prefill`` the traced ``model.onnx``.

Usage: python benchmarks/onnx_perplexity.py ART_DIR [--windows 32] [--seqlen 2048] [--torch] [--graph decoder]
"""

import argparse
import json
import sys
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--data", default="wikitext2")
    ap.add_argument("--torch", action="store_true", help="recompute the torch perplexity instead of reading the report")
    ap.add_argument("--graph", default="decoder", choices=["decoder", "decode", "prefill"])
    a = ap.parse_args()
    from lowbit.compiler.engine import data
    from lowbit.compiler.engine.evaluate import perplexity
    from lowbit.runtime.artifact import load
    from lowbit.runtime.onnx_runtime import OrtDecoder, session

    d = Path(a.artifact)
    art = load(d)
    tokens, _ = data.eval_tokens(art.tokenizer, a.data)
    meta = json.loads((d / "onnx" / "export.json").read_text())
    if a.graph == "decoder":
        dec = OrtDecoder(d / "onnx")

        def ort_logits(ids):
            return torch.from_numpy(dec.step(ids.numpy(), dec.empty_cache(ids.shape[0]))[0])
    elif a.graph == "decode":
        dec = OrtDecoder(d / "onnx")

        def ort_logits(ids):
            cache, out = dec.empty_cache(ids.shape[0]), []
            for t in range(ids.shape[1]):
                logits, cache = dec.step(ids[:, t:t + 1].numpy(), cache)
                out.append(torch.from_numpy(logits))
            return torch.cat(out, 1)
    else:
        s = session(d / "onnx")

        def ort_logits(ids):
            return torch.from_numpy(s.run(None, {"input_ids": ids.numpy()})[0])

    r_ort = perplexity(ort_logits, tokens, a.seqlen, a.windows, label="onnxruntime")
    # lowbit-compile's report; a lowbit-finetune artifact has finetune.json instead, whose figure is recomputed
    report = d / "report.json"
    ev = json.loads(report.read_text()).get("eval", {}).get(a.data, {}).get("after") if report.is_file() else None
    reported = ev is not None and (ev["windows"], ev["seqlen"]) == (a.windows, a.seqlen)
    if not a.torch and not reported:
        print(f"[onnx_perplexity] {report} has no {a.data} perplexity on {a.windows} x {a.seqlen}: computing "
              "the torch figure", file=sys.stderr)
    r_t = ev["ppl"] if reported and not a.torch else perplexity(art, tokens, a.seqlen, a.windows, label="torch")["ppl"]
    print(f"{d.name}: {a.data} {a.windows} x {a.seqlen}: onnxruntime {a.graph} {r_ort['ppl']:.3f} "
          f"(accuracy_level {meta['accuracy_level']}, {r_ort['seconds']:.0f}s) vs torch {r_t:.3f}: "
          f"{100 * (r_ort['ppl'] / r_t - 1):+.2f}%")


if __name__ == "__main__":
    sys.exit(main())
