"""MLIR lowering through torch-mlir: the decomposed torch graph equals the artifact, every dialect module
verifies, and the packed weights appear as integer constants (no dequantized float copy)."""

import json

import pytest
import torch

pytest.importorskip("torch_mlir")

from lowbit.compiler.frontend.cli import compile_main, export_main  # noqa: E402
from lowbit.compiler.lowering.mlir import decomposed_program  # noqa: E402
from lowbit.runtime.artifact import load  # noqa: E402


def _compile(tiny_dir, text_file, out, *method):
    argv = [str(tiny_dir("llama")), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "64", "-q",
            "--float-dtype", "float32", "-o", str(out), *method]
    assert compile_main(argv) == 0
    return out


@pytest.mark.parametrize("name,flags", [
    ("w4g32", ["--method", "rtn", "--bits", "4", "--group-size", "32"]),
    ("w3g24-sym", ["--method", "rtn", "--bits", "3", "--group-size", "24", "--sym"]),
    ("billm", ["--method", "billm", "--billm-block-size", "32", "--billm-outlier-ratio", "2"]),
    ("reallm", ["--method", "reallm", "--bits-budget", "3.4", "--reallm-candidates", "d2b4g32r0,d2b6g32r0,d2b5g32r4",
                "--reallm-kmeans-iters", "4"]),
])
def test_decomposed_graph_matches_artifact(tiny_dir, text_file, tmp_path, name, flags):
    d = _compile(tiny_dir, text_file, tmp_path / name, *flags)
    art = load(d)
    ep, rep = decomposed_program(art)
    assert sum(rep.changed.values()) == 14
    assert not [n for n in ep.graph.nodes if n.op == "call_function" and "lowbit" in str(n.target)]
    ids = torch.randint(0, 200, (2, 9))
    torch.testing.assert_close(ep.module()(ids), art(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,flags", [
    ("w4g32", ["--method", "rtn", "--bits", "4", "--group-size", "32"]),
    # BiLLM's MLIR equivalence stays in the default suite (test_decomposed_graph_matches_artifact); its four-dialect
    # export takes ~70 s
    pytest.param("billm", ["--method", "billm", "--billm-block-size", "32"], marks=pytest.mark.slow),
])
def test_mlir_modules_verify_and_keep_weights_packed(tiny_dir, text_file, tmp_path, name, flags):
    d = _compile(tiny_dir, text_file, tmp_path / name, *flags)
    assert export_main([str(d), "--mlir", "--static-shape", "1,16"]) == 0
    meta = json.loads((d / "mlir" / "export.json").read_text())
    assert meta["check"]["max_rel_err_vs_artifact"] < 1e-5
    packed = load(d).packed_bytes()
    man = json.loads((d / "manifest.json").read_text())
    u8 = sum(4 * 0 + int(torch.tensor(t["shape"]).prod()) for k, t in man["tensors"].items()
             if t["dtype"] == "torch.uint8")
    for dialect in ("torch", "linalg-on-tensors", "tosa", "stablehlo"):
        r = meta["dialects"][dialect]
        assert "error" not in r, r
        assert (d / "mlir" / r["file"]).stat().st_size > 0
        c = r["constants"]
        ints = c.get("ui8", 0) + c.get("i8", 0) + c.get("si8", 0)
        # every packed byte is an 8-bit integer constant (plus BiLLM's int8 column kinds)
        assert u8 <= ints <= u8 + 4 * 64 * 8
        if name == "w4g32":  # uniform: the compressed layers' constants are the packed bytes (within 5%)
            assert abs(ints + c.get("f16", 0) - packed) <= 0.05 * packed
    # float constants: embeddings/norms only, never a dequantized weight
    assert meta["dialects"]["torch"]["constants"].get("f32", 0) < 4 * 260 * 64 * 1.2 + 4 * 64 * 20


def test_target_mlir_and_bad_dialect(tiny_dir, text_file, tmp_path, capsys):
    out = tmp_path / "t"
    argv = [str(tiny_dir("llama")), "--calib", str(text_file), "--nsamples", "2", "--seqlen", "32", "-q",
            "--method", "rtn", "--bits", "4", "--group-size", "32", "--target", "mlir", "-o", str(out)]
    assert compile_main(argv) == 0
    assert (out / "mlir" / "model.linalg-on-tensors.mlirbc").is_file()
    assert export_main([str(out), "--mlir", "--dialects", "spirv", "--overwrite"]) == 2
    assert "unknown MLIR dialect" in capsys.readouterr().err
    assert not [p for p in out.iterdir() if ".partial-" in p.name]
