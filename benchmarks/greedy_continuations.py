"""Greedy continuations of three fixed prompts: the float model's next to each artifact's (issue 23's 1.7-bit row
shows what a model at that perplexity still says).

Each prompt is extended by --tokens tokens, greedily (argmax, full recomputation per token, no sampling), by the
float model (``--float``, default the bundled SmolLM2-135M) and by each artifact's torch program with its own
tokenizer. Prints a markdown table: prompt, then one column per model.

Usage: python benchmarks/greedy_continuations.py out/reproduce/reallm-1.7-kd [ART ...] [--tokens 20]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

PROMPTS = ["The capital of France is", "Water boils at a temperature of", "Once upon a time, there was a little"]


def continue_greedily(forward, tok, prompt: str, tokens: int) -> str:
    ids = tok(prompt, return_tensors="pt").input_ids
    for _ in range(tokens):
        with torch.no_grad():
            nxt = int(forward(ids)[0, -1].argmax())
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return tok.decode(ids[0, -tokens:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifacts", nargs="+", help="artifact directories written by lowbit-compile / lowbit-finetune")
    ap.add_argument("--float", dest="float_model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--no-float", action="store_true", help="only the artifacts' columns")
    a = ap.parse_args(argv)
    from lowbit.compiler.engine import models
    from lowbit.runtime.artifact import load

    cols = {}
    if not a.no_float:
        model, tok, _ = models.load(a.float_model)
        cols[f"float ({a.float_model})"] = [continue_greedily(lambda ids: model(ids).logits, tok, p, a.tokens)
                                            for p in PROMPTS]
        del model
    for d in a.artifacts:
        art = load(d)  # its own tokenizer (the artifact's tokenizer/ folder)
        cols[Path(d).name] = [continue_greedily(lambda ids: art(ids), art.tokenizer, p, a.tokens) for p in PROMPTS]

    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ⏎ ")

    print("| prompt | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for i, p in enumerate(PROMPTS):
        print(f"| {cell(p)} | " + " | ".join(cell(c[i]) for c in cols.values()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
