"""Per-layer latency in ONNX Runtime: a float32 MatMul against each exported lowbit layer, same shapes.

Each layer is a one-op torch module exported through the same lowering as whole models (ToMatMulNBits
pass + lowbit translations), so what is timed is exactly what `lowbit-export` writes: MatMulNBits for
uniform 4/2-bit (accuracy_level 4 and 0), the lowbit.AffineLinear function for 3-bit, lowbit.BinaryLinear
for BiLLM. Shapes: SmolLM2-135M (576x576, 1536x576, 576x1536) and Llama-7B-like (4096x4096, 11008x4096,
4096x11008) as out x in, at M = 1 and 32 rows. Ratios are float MatMul time / layer time (>1 = faster).

Usage: python benchmarks/onnx_layers.py [--shapes smol,7b] [--reps 20]
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lowbit.compiler.lowering.onnx import _onnx_program, save_model
from lowbit.passes.base import PassContext
from lowbit.passes.methods.billm import BiLLMConfig, billm_quantize
from lowbit.passes.methods.quant import rtn_quantize
from lowbit.passes.ort_layout import ToMatMulNBits
from lowbit.runtime import ops
from lowbit.runtime.onnx_runtime import session

SHAPES = {"smol": [(576, 576), (1536, 576), (576, 1536)], "7b": [(4096, 4096), (11008, 4096), (4096, 11008)]}


class Layer(torch.nn.Module):
    def __init__(self, fmt=None, weight=None):
        super().__init__()
        self.fmt = fmt
        if fmt is None:
            self.weight = torch.nn.Parameter(weight, requires_grad=False)
        else:
            for k, v in fmt.tensors().items():
                self.register_buffer(k, v)

    def forward(self, x):
        if self.fmt is None:
            return x @ self.weight.t()
        if self.fmt.kind == "affine_int":
            f = self.fmt
            return ops.affine_linear(x, self.qweight, self.scales, getattr(self, "zeros", None), None, None, None,
                                     f.bits, f.group_size, f.in_features)
        f = self.fmt
        return ops.binary_linear(x, self.signs, self.residual_signs, self.salient_cols, self.group, self.alphas,
                                 None, None, None, None, f.block_size, f.in_features)


def build(layer, k, path: Path, acc: int):
    x = torch.randn(2, k)
    ep = torch.export.export(layer, (x,), dynamic_shapes=({0: torch.export.Dim("m", min=1, max=4096)},))
    gm = ep.module()
    ToMatMulNBits().run(gm, PassContext())
    ep = torch.export.export(gm, (x,), dynamic_shapes=({0: torch.export.Dim("m", min=1, max=4096)},))
    save_model(_onnx_program(ep, (x,), acc, ["x"], ["y"]), path)
    return session(path.parent, path.name, verify=False)


def time_it(sess, m, k, reps):
    x = np.random.default_rng(0).standard_normal((m, k)).astype(np.float32)
    for _ in range(3):
        sess.run(None, {"x": x})
    t = time.perf_counter()
    for _ in range(reps):
        sess.run(None, {"x": x})
    return (time.perf_counter() - t) / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="smol,7b")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--m", default="1,32")
    a = ap.parse_args()
    ms = [int(x) for x in a.m.split(",")]
    tmp = Path(tempfile.mkdtemp())
    print(f"ONNX Runtime {__import__('onnxruntime').__version__} on {os.cpu_count()} CPU threads; ms per call; "
          "ratio = float32 MatMul time / layer time\n")
    print("| shape (out x in) | M | float32 MatMul | MatMulNBits 4b g128 acc4 | acc0 | MatMulNBits 2b g64 acc4 | "
          "lowbit 3b g128 | lowbit BiLLM b128 |")
    print("|---|---|---|---|---|---|---|---|")
    for group in a.shapes.split(","):
        for n, k in SHAPES[group]:
            w = torch.randn(n, k) * 0.02
            variants = {"float": (Layer(weight=w), 0)}
            f4 = rtn_quantize(w, 4, 128, False)
            variants["w4acc4"] = (Layer(f4), 4)
            variants["w4acc0"] = (Layer(f4), 0)
            variants["w2acc4"] = (Layer(rtn_quantize(w, 2, 64, False)), 4)
            variants["w3"] = (Layer(rtn_quantize(w, 3, 128, False)), 0)
            fb, _ = billm_quantize(w, torch.eye(k), BiLLMConfig(outlier_ratio=0))
            variants["billm"] = (Layer(fb), 0)
            sess = {name: build(layer, k, tmp / f"{name}-{n}x{k}.onnx", acc) for name, (layer, acc) in variants.items()}
            for m in ms:
                t = {name: time_it(s, m, k, a.reps) for name, s in sess.items()}
                cells = [f"{t['float'] * 1e3:.3f}"] + [
                    f"{t[v] * 1e3:.3f} ({t['float'] / t[v]:.2f}x)" for v in ("w4acc4", "w4acc0", "w2acc4", "w3", "billm")]
                print(f"| {n}x{k} | {m} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
