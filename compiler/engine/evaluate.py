"""Perplexity with the GPTQ protocol: text tokenized once, non-overlapping windows of ``seqlen``.

``perplexity = exp(mean NLL over every predicted token)``; each window predicts its tokens 1..seqlen-1.
"""

from __future__ import annotations

import math
import sys
import time

import torch


def perplexity(logits_fn, tokens: torch.Tensor, seqlen: int = 2048, windows: int | None = None,
               label: str = "eval", progress: bool = True) -> dict:
    total = tokens.numel() // seqlen
    if total == 0:
        raise ValueError(f"evaluation text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    n = total if windows is None else min(windows, total)
    nll_sum, count = 0.0, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(n):
            ids = tokens[i * seqlen : (i + 1) * seqlen].unsqueeze(0)
            logits = logits_fn(ids).float()
            nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            nll_sum += float(nll)
            count += seqlen - 1
            if progress:
                print(f"[{label}] window {i + 1}/{n}: running ppl {math.exp(nll_sum / count):.3f} "
                      f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    ppl = math.exp(nll_sum / count)
    return {"ppl": ppl, "windows": n, "of_windows": total, "seqlen": seqlen, "tokens": count,
            "seconds": time.perf_counter() - t0}
