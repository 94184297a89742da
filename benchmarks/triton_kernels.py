"""Triton kernels on a GPU: per-shape latency and effective bandwidth against torch fp16 matmul and against
the eager dequantize-then-matmul reference; whole-model decode tokens/s of a compiled SmolLM2 against fp16.

One command on a CUDA machine:  python benchmarks/triton_kernels.py [--artifact DIR] [--reps 200]
(``--smoke`` runs the same code on CPU under ``TRITON_INTERPRET=1`` with tiny shapes: a check that the script
works, not a measurement; the test suite runs it.)

Effective bandwidth = bytes the kernel must read (packed weight + scales/zeros + activations + output) /
time; the H100's HBM3 peak (~3.35 TB/s SXM) is printed beside it, so each kernel's distance from the
memory-bandwidth limit is visible. Speed-up = fp16 matmul time / kernel time (measured in the same run).
Shapes: SmolLM2 (576x576, 1536x576, 576x1536) and Llama-7B-like (4096x4096, 11008x4096, 4096x11008), out x in,
at M = 1, 16, 128. The first call of each kernel and shape autotunes its tile (untimed warm-up).
"""

import argparse
import os
import sys
import time

if "--smoke" in sys.argv:  # must be set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

SHAPES = [(576, 576), (1536, 576), (576, 1536), (4096, 4096), (11008, 4096), (4096, 11008)]
SMOKE_SHAPES = [(40, 96)]
PEAK_GBS = {"H100": 3350.0, "H200": 4800.0}


def bench(fn, reps, device):
    """Mean seconds per call (CUDA events on a GPU, wall clock on CPU)."""
    for _ in range(3 if device == "cpu" else 10):
        fn()
    if device == "cpu":
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3  # seconds


def kernels_table(reps, device, shapes, rows):
    from lowbit.kernels import dispatch
    from lowbit.passes.methods.billm import BiLLMConfig, billm_quantize
    from lowbit.passes.methods.quant import rtn_quantize
    from lowbit.runtime.formats import VQCodebook, dequantize_affine, dequantize_binary, dequantize_vq

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter: not a measurement)"
    peak = next((v for k, v in PEAK_GBS.items() if k in name), None)
    print(f"{name}; peak HBM bandwidth {peak or '?'} GB/s; times in microseconds\n")
    print("| shape (out x in) | M | fp16 matmul | format | kernel | GB/s (% of peak) | vs fp16 | eager dequant+matmul | vs eager |")
    print("|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for n, k in shapes:
        w = torch.randn(n, k) * 0.02
        wh = w.half().to(device)
        fmts = {f"w{b}g{g}": rtn_quantize(w, b, g, False) for b, g in ((4, 128), (3, 128), (2, 64), (8, 128))}
        fb, _ = billm_quantize(w, torch.eye(k), BiLLMConfig(outlier_ratio=0))
        fmts["billm b128"] = fb
        for d, b in ((2, 6), (4, 8)):  # ReALLM VQ: 3 and 2 index bits per weight, g128, permuted columns
            gen = torch.Generator().manual_seed(0)
            fmts[f"vq d{d}b{b}g128"] = VQCodebook.from_indices(
                torch.randint(0, 1 << b, (n, k // d), generator=gen), torch.randn(1 << b, d, generator=gen),
                torch.rand(n, -(-k // 128), generator=gen), b, 128, perm=torch.randperm(k, generator=gen))
        for label, f in fmts.items():
            for kk, v in f.tensors().items():
                setattr(f, kk, v.to(device))
        for m in rows:
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            t16 = bench(lambda: x @ wh.t(), reps, device)
            for label, f in fmts.items():
                if f.kind == "affine_int":
                    run = lambda: dispatch.affine_linear(x, f.qweight, f.scales, f.zeros, None, None, None,  # noqa: E731
                                                         f.bits, f.group_size, f.in_features)
                    eager = lambda: x @ dequantize_affine(f.qweight, f.scales, f.zeros, f.bits, f.group_size,  # noqa: E731
                                                          f.in_features).half().t()
                elif f.kind == "vq_codebook":
                    run = lambda: dispatch.vq_linear(x, f.codes, f.codebook, f.scales, f.perm, None, None, None,  # noqa: E731
                                                     f.index_bits, f.vec_dim, f.group_size, f.in_features)
                    eager = lambda: x @ dequantize_vq(f.codes, f.codebook, f.scales, f.perm, f.index_bits,  # noqa: E731
                                                      f.vec_dim, f.group_size, f.in_features).half().t()
                else:
                    run = lambda: dispatch.binary_linear(x, f.signs, f.residual_signs, f.salient_cols, f.group,  # noqa: E731
                                                         f.alphas, f.mus, f.outlier_cols, f.outlier_vals, None,
                                                         f.block_size, f.in_features)
                    eager = lambda: x @ dequantize_binary(f.signs, f.residual_signs, f.salient_cols, f.group,  # noqa: E731
                                                          f.alphas, f.mus, f.block_size, f.in_features).half().t()
                ref = eager().float()
                worst = max(worst, float((run().float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)))
                tk, te = bench(run, reps, device), bench(eager, max(2, reps // 10), device)
                nbytes = f.nbytes() + x.numel() * 2 + m * n * 2
                gbs = nbytes / tk / 1e9
                pct = f" ({100 * gbs / peak:.0f}%)" if peak else ""
                print(f"| {n}x{k} | {m} | {t16 * 1e6:.1f} | {label} | {tk * 1e6:.1f} | {gbs:.0f}{pct} | "
                      f"{t16 / tk:.2f}x | {te * 1e6:.1f} | {te / tk:.1f}x |", flush=True)
    print(f"\nlargest kernel-vs-eager difference (relative to max |output|): {worst:.2e}")
    return worst


def _source_spec(art) -> str:
    """The model the artifact was compiled from: its recorded source path if it still exists, else its id."""
    m = art.manifest["model"]
    return m["source"] if m.get("source") and os.path.exists(m["source"]) else m["id"]


def decode_table(artifact, device, tokens, float_model_spec=None):
    """Greedy decode tokens/s: the artifact (its compressed linears run their lowbit ops, i.e. the Triton
    kernels on CUDA) against the source model in fp16, both as eager Hugging Face models with a KV cache."""
    from lowbit.compiler.engine import models
    from lowbit.compiler.engine.packed_model import packed_model
    from lowbit.kernels.dispatch import force_reference
    from lowbit.runtime.artifact import load

    dtype = torch.float16 if device == "cuda" else torch.float32
    art = load(artifact)
    lowbit_model = packed_model(art, device, dtype)
    float_model, _, _ = models.load(float_model_spec or _source_spec(art))
    float_model = float_model.to(device, dtype).eval()
    vocab = float_model.config.vocab_size

    def rate(model):
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (1, 16), generator=gen).to(device)
        out = model(input_ids=ids, use_cache=True)
        for _ in range(3):  # warm-up (autotuning of the decode shapes happens here)
            out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(tokens):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return tokens / (time.perf_counter() - t)

    with torch.no_grad():
        ids = torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(1)).to(device)
        fast = lowbit_model(input_ids=ids).logits.float()
        force_reference(True)
        try:
            ref = lowbit_model(input_ids=ids).logits.float()
        finally:
            force_reference(False)
        diff = float((fast - ref).abs().max() / ref.abs().max())
        tq, tf = rate(lowbit_model), rate(float_model)
    print(f"\nwhole-model greedy decode ({artifact}, {tokens} tokens, {dtype}): lowbit {tq:.1f} tok/s vs float "
          f"{tf:.1f} tok/s ({tq / tf:.2f}x); logits kernels vs eager reference: max rel. diff {diff:.2e}")
    return diff


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", default=None, help="a compiled artifact for the whole-model decode figure")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--float-model", default=None,
                    help="the float model to compare with (default: the artifact's recorded source)")
    ap.add_argument("--tokens", type=int, default=128, help="decode steps timed for the whole-model figure")
    ap.add_argument("--smoke", action="store_true",
                    help="run on CPU under TRITON_INTERPRET=1 with tiny shapes (checks the script, measures nothing)")
    a = ap.parse_args()
    if a.smoke:
        kernels_table(1, "cpu", SMOKE_SHAPES, (1, 16))
        if a.artifact:
            decode_table(a.artifact, "cpu", 2, a.float_model)
        return 0
    if not torch.cuda.is_available():
        print("triton_kernels.py needs a CUDA GPU (the kernels' correctness is tested on CPU by the test suite; "
              "--smoke runs this script there)")
        return 2
    kernels_table(a.reps, "cuda", SHAPES, (1, 16, 128))
    if a.artifact:
        decode_table(a.artifact, "cuda", a.tokens, a.float_model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
