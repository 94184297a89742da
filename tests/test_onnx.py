"""ONNX lowering: every format and tiny architecture runs in stock ONNX Runtime with parity; the graph
holds the expected MatMulNBits / lowbit nodes and no float copy of a packed weight; the KV-cache decoder
matches full recomputation; corrupt files fail at load with a clear message."""

import json

import onnx
import pytest
import torch

from lowbit.compiler.frontend.cli import compile_main, export_main
from lowbit.compiler.lowering.onnx_artifact import export_artifact
from lowbit.compiler.lowering.onnx import node_counts
from lowbit.runtime.artifact import load
from lowbit.runtime.onnx_runtime import OnnxModelError, OrtDecoder, session
from lowbit.runtime.tolerances import tolerance


def _compile(tiny_dir, text_file, out, arch, *method, float_dtype="float32"):
    argv = [str(tiny_dir(arch)), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "64", "-q",
            "--float-dtype", float_dtype, "-o", str(out), *method]
    assert compile_main(argv) == 0
    return out


def _ort_logits(d, ids):
    s = session(d / "onnx")
    return torch.from_numpy(s.run(None, {"input_ids": ids.numpy()})[0])


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _float_initializers(path):
    m = onnx.load(str(path), load_external_data=False)
    return [t for t in m.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]


# Every uniform width / group / symmetry in one model, one format per linear (the mixed per-module case too): one
# compile and export instead of one per format (each took ~25 s of the default suite).
UNIFORM = {  # module: (bits, group size, symmetric); the tiny Llama has 2 blocks x 7 linears
    "layers.0.self_attn.q_proj": (4, 32, False),
    "layers.0.self_attn.k_proj": (2, 16, False),
    "layers.0.self_attn.v_proj": (8, 32, False),
    "layers.0.self_attn.o_proj": (4, 32, True),
    "layers.0.mlp.gate_proj": (3, 32, False),   # held exactly as 4-bit
    "layers.0.mlp.up_proj": (3, 32, True),
    "layers.0.mlp.down_proj": (1, 16, False),   # as 2-bit
    "layers.1.self_attn.q_proj": (6, 32, False),  # as 8-bit
    "layers.1.self_attn.k_proj": (6, 32, True),   # doubled: 7 in 8
    "layers.1.self_attn.v_proj": (4, 24, False),  # not a power of two: the lowbit function
    "layers.1.self_attn.o_proj": (8, 32, True),   # symmetric 8-bit: the lowbit function
    "layers.1.mlp.gate_proj": (2, 32, True),
    "layers.1.mlp.up_proj": (5, 32, False),       # as 8-bit
    "layers.1.mlp.down_proj": (4, 64, False),
}
FUNCTION_ONLY = {"layers.1.self_attn.v_proj", "layers.1.self_attn.o_proj"}

FORMATS = {  # name: (method flags, expected MatMulNBits nodes, expected lowbit function calls)
    "uniform-mixed": (["--method", "rtn"], 14 - len(FUNCTION_ONLY), len(FUNCTION_ONLY)),
    "apiq-w4g32-r4": (["--method", "apiq", "--bits", "4", "--group-size", "32", "--lora-rank", "4",
                       "--apiq-epochs", "1"], 14, 0),
    "billm": (["--method", "billm", "--billm-block-size", "32", "--billm-outlier-ratio", "2"], 0, 14),
    "reallm": (["--method", "reallm", "--bits-budget", "3.4", "--reallm-candidates", "d2b4g32r0,d2b6g32r0,d2b5g32r4",
                "--reallm-kmeans-iters", "4"], 0, 14),
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_formats_match_reference_in_onnxruntime(tiny_dir, text_file, tmp_path, name):
    flags, n_nbits, n_fn = FORMATS[name]
    if name == "uniform-mixed":
        rules = [{"match": m, "bits": b, "group_size": g, "symmetric": sym} for m, (b, g, sym) in UNIFORM.items()]
        (tmp_path / "rules.json").write_text(json.dumps({"rule": rules}))
        flags = [*flags, "--overrides", str(tmp_path / "rules.json")]
    d = _compile(tiny_dir, text_file, tmp_path / name, "llama", *flags)
    s = export_artifact(d, accuracy_level=0, kv_cache=False, progress=lambda m: None)
    nodes = node_counts(d / "onnx" / "model.onnx")
    assert nodes.get("com.microsoft::MatMulNBits", 0) == n_nbits
    assert sum(v for k, v in nodes.items() if k.startswith("lowbit::")) == n_fn
    modules = json.loads((d / "manifest.json").read_text())["modules"]
    if name == "uniform-mixed":  # every rule took effect
        got = {k.removeprefix("model."): (m["format"]["bits"], m["format"]["group_size"], m["format"]["symmetric"])
               for k, m in modules.items()}
        assert got == UNIFORM
    # no float tensor shaped like a compressed weight (nothing was dequantized at export)
    shapes = {(m["format"]["out_features"], m["format"]["in_features"]) for m in modules.values()}
    for t in _float_initializers(d / "onnx" / "model.onnx"):
        assert tuple(t.dims) not in shapes and tuple(t.dims)[::-1] not in shapes, t.name
    ids = torch.randint(0, 200, (2, 11))
    ref = load(d)(ids).float()
    kind = "onnx-matmulnbits-0" if n_nbits else "onnx-functions"
    tol = max(tolerance("onnx-matmulnbits-0"), tolerance("onnx-functions")) if n_nbits and n_fn else tolerance(kind)
    assert _rel(_ort_logits(d, ids), ref) < tol
    assert s["check"]["max_rel_err_vs_torch"] < tol
    if name == "billm":
        assert any(m["format"].get("num_outliers", 0) for m in modules.values())


@pytest.mark.parametrize("arch", ["llama", "qwen2", pytest.param("mistral", marks=pytest.mark.slow), "phi3", "opt",
                                  "gpt2"])  # mistral: llama's graph plus a sliding window; -m slow runs it
def test_architectures_export_with_matmulnbits(tiny_dir, text_file, tmp_path, arch):
    d = _compile(tiny_dir, text_file, tmp_path / arch, arch, "--method", "rtn", "--bits", "4", "--group-size", "32")
    export_artifact(d, accuracy_level=4, kv_cache=False, progress=lambda m: None)
    n = len(json.loads((d / "manifest.json").read_text())["modules"])
    assert node_counts(d / "onnx" / "model.onnx").get("com.microsoft::MatMulNBits", 0) == n
    ids = torch.randint(0, 200, (1, 9))
    assert _rel(_ort_logits(d, ids), load(d)(ids).float()) < tolerance("onnx-matmulnbits-4")


@pytest.fixture(scope="module")
def exported(tiny_dir, text_file, tmp_path_factory):
    from lowbit.compiler.lowering import onnx as onnx_export

    # float16 storage (the default): the tied embedding goes to the file in fp16 behind a Cast
    d = _compile(tiny_dir, text_file, tmp_path_factory.mktemp("kv") / "art", "llama",
                 "--method", "rtn", "--bits", "4", "--group-size", "32", float_dtype="float16")
    old, onnx_export.FP16_MIN_ELEMENTS = onnx_export.FP16_MIN_ELEMENTS, 1024
    try:
        assert export_main([str(d), "--onnx", "--accuracy-level", "0"]) == 0
    finally:
        onnx_export.FP16_MIN_ELEMENTS = old
    m = onnx.load(str(d / "onnx" / "model.onnx"), load_external_data=False)
    assert any(n.op_type == "Cast" and n.name.startswith("storage_cast_") for n in m.graph.node)
    return d


def test_decoder_with_kv_cache_matches_full_recompute(exported):
    d = exported
    dec = OrtDecoder(d / "onnx")
    ids = torch.randint(0, 200, (1, 7))
    ref = load(d)(ids).float()
    logits, cache = dec.step(ids[:, :4].numpy(), dec.empty_cache())  # prefill 4 tokens
    got = [torch.from_numpy(logits)]
    for t in range(4, 7):  # then one token per step
        logits, cache = dec.step(ids[:, t : t + 1].numpy(), cache)
        got.append(torch.from_numpy(logits))
    assert cache[0].shape[2] == 7
    assert _rel(torch.cat(got, 1), ref) < tolerance("onnx-matmulnbits-0")
    out, _, _ = dec.generate(ids[0].tolist(), 5)
    assert len(out) == 5 and out[0] == int(ref[0, -1].argmax())


def test_run_with_onnxruntime_streams_tokens(exported, capsys):
    from lowbit.compiler.frontend.cli import run_main

    assert run_main([str(exported), "--runtime", "onnxruntime", "--prompt", "the river", "--max-new-tokens", "4"]) == 0
    assert "tokens/s" in capsys.readouterr().err


def test_corrupt_onnx_fails_clearly(exported, tmp_path):
    import shutil

    src = exported / "onnx"
    # 1. a deleted initializer
    bad = tmp_path / "missing"
    shutil.copytree(src, bad)
    m = onnx.load(str(bad / "model.onnx"), load_external_data=False)
    victim = next(t for t in m.graph.initializer if "nbits_b" in t.name)
    m.graph.initializer.remove(victim)
    onnx.save(m, str(bad / "model.onnx"))
    with pytest.raises(OnnxModelError, match="missing initializer"):
        session(bad, verify=False)
    # 2. a packed weight with the wrong shape
    bad2 = tmp_path / "shape"
    shutil.copytree(src, bad2)
    m = onnx.load(str(bad2 / "model.onnx"), load_external_data=False)
    t = next(t for t in m.graph.initializer if "nbits_b" in t.name)
    t.dims[1] += 1
    onnx.save(m, str(bad2 / "model.onnx"))
    with pytest.raises(OnnxModelError, match="MatMulNBits node .*expected"):
        session(bad2, verify=False)
    # 3. a hand-edited file is caught by the export record
    with pytest.raises(OnnxModelError, match="modified or corrupt"):
        session(bad2)
    # 4. not ONNX at all
    bad3 = tmp_path / "garbage"
    shutil.copytree(src, bad3)
    (bad3 / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(OnnxModelError, match="not a readable ONNX model"):
        session(bad3, verify=False)


def test_export_refuses_existing_and_leaves_nothing(exported, capsys):
    assert export_main([str(exported), "--onnx"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert not [p for p in exported.iterdir() if ".partial-" in p.name]


def test_activation_outlier_split_is_exact_and_found(tmp_path):
    """Massive input channels leave the int8 path of MatMulNBits: the rewritten layer still equals the
    reference (float path for those channels), in torch and in ONNX Runtime."""
    from lowbit.compiler.lowering.onnx import _onnx_program, save_model
    from lowbit.passes.base import PassContext
    from lowbit.passes.methods.quant import rtn_quantize
    from lowbit.passes.ort_layout import ToMatMulNBits, activation_outliers
    from lowbit.runtime import ops

    from lowbit.runtime.formats import LowRank

    fmt = rtn_quantize(torch.randn(40, 96), 4, 32, False)
    # with a low-rank branch: it must be added to the outlier-corrected output, not replace it
    fmt.lowrank = LowRank(torch.randn(3, 96).half() * 0.1, torch.randn(40, 3).half() * 0.1)

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for k, v in fmt.tensors().items():
                self.register_buffer(k, v)

        def forward(self, x):
            return ops.affine_linear(x, self.qweight, self.scales, self.zeros, None, self.lora_a, self.lora_b,
                                     4, 32, 96)

    x = torch.randn(3, 96)
    x[:, [5, 60]] *= 500  # two massive channels
    ep = torch.export.export(One(), (x,), dynamic_shapes=({0: torch.export.Dim("m", min=1, max=64)},))
    gm = ep.module()
    found = activation_outliers(gm, [x])
    assert [v.tolist() for v in found.values()] == [[5, 60]]
    rep = ToMatMulNBits(outlier_channels=found).run(gm, PassContext())
    assert rep.changed["activation outlier splits"] == 1
    ref = x @ fmt.dequantize().t()
    torch.testing.assert_close(gm(x), ref, rtol=1e-4, atol=1e-3)
    ep2 = torch.export.export(gm, (x,), dynamic_shapes=({0: torch.export.Dim("m", min=1, max=64)},))
    for acc, tol in ((0, 1e-4), (4, 2e-2)):
        path = tmp_path / f"one{acc}.onnx"
        save_model(_onnx_program(ep2, (x,), acc, ["x"], ["y"]), path)
        y = torch.from_numpy(session(tmp_path, path.name, verify=False).run(None, {"x": x.numpy()})[0])
        assert _rel(y, ref) < tol
