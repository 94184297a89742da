"""Compile a model with lowbit's Python API, as a build system would: load, calibrate (with per-module
overrides), run lowbit's passes plus your own, save the artifact, lower it to ONNX and MLIR, check it.

    python examples/compile_and_lower.py MODEL OUT_DIR [--calib c4|FILE] [--nsamples N] [--seqlen L]

MODEL: a Hugging Face directory, a .gguf file, or smollm2-135m. Exit status 0 when every step succeeded.
"""

import argparse
import sys

import torch

import lowbit.api as lb


class CountLowbitOps:
    """A user pass: the protocol is a ``name`` and ``run(gm, ctx) -> PassReport``."""

    name = "count-lowbit-ops"

    def run(self, gm, ctx):
        rep = lb.PassReport(self.name)
        n = sum(1 for node in gm.graph.nodes if node.op == "call_function" and "lowbit" in str(node.target))
        rep.details["lowbit_ops"] = n
        if n == 0:
            raise RuntimeError("no lowbit op in the graph: nothing was compressed")
        return rep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("output")
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--mlir-dialects", default="torch,linalg-on-tensors")
    a = ap.parse_args(argv)
    try:
        model, tok, _ = lb.load_model(a.model)
        windows, _ = lb.calibration_data(tok, a.calib, a.nsamples, a.seqlen)
        # 2-bit GPTQ everywhere, except the first block and lm_head at 4 bits
        cal = lb.calibrate(model, "gptq", windows, bits=2, group_size=32, progress=False,
                           overrides=[{"match": "lm_head", "bits": 4}, {"match": "layers.0.*", "bits": 4}])
        gm = lb.capture(model)
        reports = lb.run_passes(gm, cal, ["find-linear-sites", "replace-linears", "verify", CountLowbitOps(),
                                          "clean-up"], calib_batch=windows[:1], log=None)
        print(f"lowbit ops in the graph: {reports[3].details['lowbit_ops']}")
        lb.save(a.output, gm, cal, tok, model, overwrite=True)
        onnx = lb.lower(a.output, "onnx", overwrite=True, progress=lambda m: None)
        mlir = lb.lower(a.output, "mlir", overwrite=True, dialects=tuple(a.mlir_dialects.split(",")),
                        progress=lambda m: None)
        art = lb.load(a.output)
        ids = windows[:1, :16]
        with torch.no_grad():
            ref = model(input_ids=ids, use_cache=False).logits
        rel = float((art(ids) - ref).norm() / ref.norm())
        print(f"artifact {a.output}: {art.packed_bytes()} packed bytes; relative logit error vs float {rel:.3f}; "
              f"ONNX Runtime vs torch {onnx['check']['max_rel_err_vs_torch']:.1e}; MLIR dialects "
              f"{[d for d, r in mlir['dialects'].items() if 'error' not in r]}")
    except (lb.LowbitError, lb.ArtifactError, lb.PassError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
