"""Compare BiLLM variants (paper vs official code) and baselines on real SmolLM2 layers.

For the linears of a few decoder blocks, Hessians H = 2/n XᵀX come from C4 calibration windows through
the float model; each variant's error is the Hessian-weighted relative output error
tr(E H Eᵀ) / tr(W H Wᵀ), E = W_q - W (what the block-sequential methods minimize), with true bits per weight.

Usage: python benchmarks/billm_variants.py [--blocks 0,11,14,29] [--nsamples 16] [--seqlen 512]
(block 11 holds the massive-activation channels of SmolLM2's down_proj; block 0's o_proj has a few more)
"""

import argparse
import time

import torch

from lowbit.compiler.engine import data, models
from lowbit.passes.methods.billm import BiLLMConfig, billm_quantize
from lowbit.passes.methods.gptq import GPTQConfig, gptq_quantize

_CODE = dict(mean_shift=True, search_on="s", search_ranges="code", outlier_ratio=0)
VARIANTS = {
    "billm code (mu, on S, 1-49/81q)": BiLLMConfig(**_CODE),
    "billm paper (no mu, on W, 3-30/9)": BiLLMConfig(outlier_ratio=0),
    "billm paper + fp16 outlier columns (default)": BiLLMConfig(),
    "billm mu, on W, code ranges": BiLLMConfig(**{**_CODE, "search_on": "w"}),
    "billm no mu, on S, code ranges": BiLLMConfig(**{**_CODE, "mean_shift": False}),
    "billm code, block 64": BiLLMConfig(**_CODE, block_size=64),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", default="0,11,14,29")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args()
    blocks = [int(b) for b in args.blocks.split(",")]
    model, tok, _ = models.load("smollm2-135m")
    windows, _ = data.calibration_windows(tok, "c4", args.nsamples, args.seqlen, 0)
    prefix, layers = models.find_blocks(model)
    lin = {f"{prefix}.{b}.{n}": m for b in blocks for n, m in layers[b].named_modules() if models.is_linear_like(m)}
    hs = {name: torch.zeros(m.in_features, m.in_features) for name, m in lin.items()}
    cnt = {name: 0 for name in lin}
    hooks = []
    for name, m in lin.items():
        def hook(mod, a, o, name=name):
            x = a[0].reshape(-1, a[0].shape[-1]).float()
            hs[name] += x.t() @ x
            cnt[name] += x.shape[0]
        hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        for i in range(windows.shape[0]):
            model(input_ids=windows[i : i + 1], use_cache=False)
    for h in hooks:
        h.remove()
    rows = {}
    secs = {}

    def record(label, name, wq, w, h, bpw, dt):
        e = wq - w
        rel = float(torch.trace(e @ h @ e.t()) / torch.trace(w @ h @ w.t()))
        rows.setdefault(label, []).append((rel, bpw, w.numel()))
        secs[label] = secs.get(label, 0) + dt

    for name, m in lin.items():
        w = m.weight.detach().float()
        h = hs[name] * 2 / cnt[name]
        for label, cfg in VARIANTS.items():
            t = time.perf_counter()
            f, _ = billm_quantize(w, h, cfg)
            record(label, name, f.dequantize(), w, h, f.bits_per_weight(), time.perf_counter() - t)
        for bits, gs in ((2, 128), (2, 64)):
            t = time.perf_counter()
            f, _ = gptq_quantize(w, h, GPTQConfig(bits=bits, group_size=gs))
            record(f"gptq w{bits}g{gs}", name, f.dequantize(), w, h, f.bits_per_weight(), time.perf_counter() - t)
        sign = torch.sign(w) * w.abs().mean(1, keepdim=True)
        record("naive sign x mean|w|", name, sign, w, h, 1.0 + 16 / w.shape[1], 0.0)
        print(f"done {name}", flush=True)
    print(f"\nSmolLM2-135M blocks {blocks}: Hessian-weighted relative output error (mean over {len(lin)} linears)\n")
    print("| variant | mean rel. error | median | true bits/weight | seconds |")
    print("|---|---|---|---|---|")
    for label, r in rows.items():
        errs = sorted(x[0] for x in r)
        bpw = sum(x[1] * x[2] for x in r) / sum(x[2] for x in r)
        print(f"| {label} | {sum(errs) / len(errs):.4f} | {errs[len(errs) // 2]:.4f} | {bpw:.3f} | {secs[label]:.1f} |")


if __name__ == "__main__":
    main()
