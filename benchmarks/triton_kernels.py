"""Triton kernels on a GPU: per-shape latency and effective bandwidth against torch fp16 matmul and against
the eager dequantize-then-matmul reference; whole-model decode tokens/s of a compiled SmolLM2 against fp16.

One command on a CUDA machine:  python benchmarks/triton_kernels.py [--artifact DIR] [--reps 200]

Effective bandwidth = bytes the kernel must read (packed weight + scales/zeros + activations + output) /
time; the H100's HBM3 peak (~3.35 TB/s SXM) is printed beside it, so each kernel's distance from the
memory-bandwidth limit is visible. Speed-up = fp16 matmul time / kernel time (measured in the same run).
Shapes: SmolLM2 (576x576, 1536x576, 576x1536) and Llama-7B-like (4096x4096, 11008x4096, 4096x11008), out x in,
at M = 1, 16, 128.
"""

import argparse
import sys
import time

import torch

SHAPES = [(576, 576), (1536, 576), (576, 1536), (4096, 4096), (11008, 4096), (4096, 11008)]
PEAK_GBS = {"H100": 3350.0, "H200": 4800.0}


def bench(fn, reps):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3  # seconds


def kernels_table(reps):
    from lowbit.kernels import dispatch
    from lowbit.passes.methods.billm import BiLLMConfig, billm_quantize
    from lowbit.passes.methods.quant import rtn_quantize
    from lowbit.runtime.formats import VQCodebook, dequantize_affine, dequantize_binary, dequantize_vq

    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_GBS.items() if k in name), None)
    print(f"{name}; peak HBM bandwidth {peak or '?'} GB/s; times in microseconds\n")
    print("| shape (out x in) | M | fp16 matmul | format | kernel | GB/s (% of peak) | vs fp16 | eager dequant+matmul | vs eager |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, k in SHAPES:
        w = torch.randn(n, k) * 0.02
        wh = w.half().cuda()
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
                setattr(f, kk, v.cuda())
        for m in (1, 16, 128):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            t16 = bench(lambda: x @ wh.t(), reps)
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
                tk, te = bench(run, reps), bench(eager, max(5, reps // 10))
                nbytes = f.nbytes() + x.numel() * 2 + m * n * 2
                gbs = nbytes / tk / 1e9
                pct = f" ({100 * gbs / peak:.0f}%)" if peak else ""
                print(f"| {n}x{k} | {m} | {t16 * 1e6:.1f} | {label} | {tk * 1e6:.1f} | {gbs:.0f}{pct} | "
                      f"{t16 / tk:.2f}x | {te * 1e6:.1f} | {te / tk:.1f}x |", flush=True)


def decode_table(artifact, tokens=128):
    """Decode tokens/s: the artifact's decoder (lowbit ops -> Triton) vs the float model in fp16."""
    from lowbit.compiler.kv_export import DecoderWithCache, _cache_shape, capture_decoder, rebuild_model
    from lowbit.runtime.artifact import load

    art = load(artifact)
    gm, _, _, _, layers = capture_decoder(art)
    gm = gm.cuda()
    base = rebuild_model(art)  # float tensors only where the artifact keeps them float
    _, kv, hd = _cache_shape(base)

    def run(step):
        cache = [torch.zeros(1, kv, 0, hd, device="cuda", dtype=torch.float32) for _ in range(2 * layers)]
        ids = torch.randint(100, 5000, (1, 16), device="cuda")
        out = step(ids, *cache)
        cache = list(out[1:])
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(tokens):
            nxt = out[0][:, -1:].argmax(-1)
            out = step(nxt, *cache)
            cache = list(out[1:])
        torch.cuda.synchronize()
        return tokens / (time.perf_counter() - t)

    with torch.no_grad():
        tq = run(gm)
        from lowbit.compiler import models

        fm, _, _ = models.load(art.manifest["model"]["id"])
        fw = DecoderWithCache(fm.half().cuda().eval(), layers)
        tf = run(lambda ids, *c: fw(ids, *[x.half() for x in c]))
    print(f"\nwhole-model decode ({artifact}): lowbit {tq:.1f} tok/s vs fp16 {tf:.1f} tok/s ({tq / tf:.2f}x)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifact", default=None, help="a compiled artifact for the whole-model decode figure")
    ap.add_argument("--reps", type=int, default=200)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("triton_kernels.py needs a CUDA GPU (the kernels' correctness is tested on CPU by the test suite)")
        return 2
    kernels_table(a.reps)
    if a.artifact:
        decode_table(a.artifact)
    return 0


if __name__ == "__main__":
    sys.exit(main())
