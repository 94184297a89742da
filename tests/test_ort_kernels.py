"""lowbit's ONNX Runtime library (``lowbit.ort`` domain): ``VQMatMul`` and ``BinaryMatMul`` equal the VQ and BiLLM
formats' references for every shape they accept (vector and scalar paths, one row and many), a decoder exported with ``--ort-kernels lowbit``
matches the torch program exactly and holds the packed bytes, and what cannot run says so.

The library is built on first use (``lowbit.runtime.ort_ops.build``: Debian's ONNX Runtime headers, g++); where it
cannot be built (no compiler, no access to Debian's archive, a CPU without AVX2) these tests are skipped; a source
that does not compile fails them."""

import dataclasses

import numpy as np
import onnx
import pytest
import torch

from lowbit.compiler.lowering.onnx_graph import GraphBuilder
from lowbit.compiler.lowering.ort_linears import lower_linear
from lowbit.errors import LowbitError
from lowbit.runtime import ort_ops
from lowbit.runtime.formats import LowRank, VQCodebook


@pytest.fixture(scope="module")
def lib():
    try:
        return ort_ops.build(progress=lambda m: None)
    except ort_ops.Unavailable as e:  # a compile error of the source fails the tests instead
        pytest.skip(f"lowbit's ONNX Runtime library cannot be built here: {e}")


def _vq(n, k, bits, d, g, perm=True, rank=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lr = LowRank(torch.randn(rank, k, generator=gen) * 0.1, torch.randn(n, rank, generator=gen) * 0.1) if rank else None
    return VQCodebook.from_indices(torch.randint(0, 1 << bits, (n, k // d), generator=gen),
                                   torch.randn(1 << bits, d, generator=gen), torch.rand(n, -(-k // g), generator=gen) + 0.5,
                                   bits, g, perm=torch.randperm(k, generator=gen) if perm else None, lowrank=lr)


def _run_graph(graph):
    """An ONNX Runtime session of ``graph`` (lowbit.ort domain imported) with lowbit's library registered."""
    import onnxruntime as ort
    from onnx import helper

    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(ort_ops.DOMAIN, 1)])
    m.ir_version = 10
    opts = ort.SessionOptions()
    ort_ops.register(opts)
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _session(fmt, bias=None, accuracy_level=0):  # one linear lowered with kernels="lowbit", run in ONNX Runtime
    from onnx import TensorProto, helper

    g = GraphBuilder()
    b = None if bias is None else torch.from_numpy(bias)
    y, rec = lower_linear(g, "x", fmt, "lin", bias=b, kernels="lowbit", accuracy_level=accuracy_level)
    g.nodes[-1].output[0] = "y"
    graph = helper.make_graph(g.nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                          [None, None, fmt.in_features])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], g.inits)
    return _run_graph(graph), rec


@pytest.mark.parametrize("n,k,bits,d,g,perm,rank,rows", [
    (64, 256, 8, 4, 128, True, 0, 1),    # ReALLM d4b8g128: the vector path, 8-bit codes
    (48, 512, 8, 8, 64, True, 0, 2),     # d8 (1 bit per weight before scales), two rows of x
    (70, 256, 6, 2, 128, True, 8, 1),    # d2b6 (read in pairs) + low rank; N not a multiple of the 32-row tasks
    (65, 512, 7, 2, 64, False, 0, 3),    # 7-bit codes straddling bytes; 3 rows of x in one GEMV
    (33, 90, 3, 3, 10, True, 2, 1),      # d=3, groups of 10: the scalar path
    (24, 64, 1, 1, 16, False, 0, 2),     # 1-bit indices, d=1
    (40, 96, 5, 2, 32, True, 4, 9),      # 9 rows: the dequantized-tile path (d2b5 pairs)
    (17, 120, 4, 4, 40, True, 0, 20),    # odd everything, tile path with a partial 4-row block
])
def test_vq_matmul_equals_the_format_reference(lib, n, k, bits, d, g, perm, rank, rows):
    fmt = _vq(n, k, bits, d, g, perm, rank)
    bias = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    sess, rec = _session(fmt, bias)
    assert rec["rel_err"] == 0.0 and "VQMatMul" in rec["lowering"]
    assert rec["ort_bytes"] <= fmt.nbytes() + 2 * k  # the packed tensors themselves (perm widened to int32)
    x = np.random.default_rng(1).standard_normal((2, rows, k)).astype(np.float32)
    got = sess.run(None, {"x": x})[0]
    ref = (torch.from_numpy(x) @ fmt.dequantize().t() + torch.from_numpy(bias)).numpy()
    assert got.shape == (2, rows, n)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def _linears(kind, gated):
    """Formats that differ (bits, vector length, groups, permutation, rank; BiLLM blocks, salient and outlier
    columns, means), one of them small enough for the serial path alone; two of one width when gated."""
    if kind == "vq":
        return [_vq(70, 96, 8, 4, 32, True, 8, seed=1), _vq(70, 96, 6, 2, 32, False, 0, seed=2)] if gated else \
            [_vq(96, 96, 8, 4, 32, True, 8, seed=1), _vq(33, 96, 3, 3, 12, True, 0, seed=2),
             _vq(40, 96, 6, 2, 32, False, 4, seed=3)]
    return [_billm(70, 256, 128, 6, 2, False, seed=1), _billm(70, 256, 64, 3, 0, True, seed=2)] if gated else \
        [_billm(64, 256, 128, 6, 2, False, seed=1), _billm(33, 256, 64, 0, 1, True, seed=2),
         _billm(40, 256, 32, 3, 0, False, seed=3)]


@pytest.mark.parametrize("kind", ["vq", "billm"])
@pytest.mark.parametrize("rows", [1, 3, 9])
@pytest.mark.parametrize("gated", [False, True])
def test_multi_linear_ops_equal_their_single_ops(lib, kind, rows, gated):
    """Several linears of one x in one ``VQLinears`` / ``BinaryLinears`` node, and the MLP's gated form
    silu(gate) * up, equal the formats' references (GEMV and tile paths)."""
    from onnx import TensorProto, helper

    from lowbit.compiler.lowering.onnx_fuse import fuse_lowbit_linears

    fmts = _linears(kind, gated)
    k = fmts[0].in_features
    biases = [None if i == 0 else np.random.default_rng(i).standard_normal(f.out_features).astype(np.float32)
              for i, f in enumerate(fmts)]
    g = GraphBuilder()
    outs = [lower_linear(g, "x", f, f"lin{i}", bias=None if b is None else torch.from_numpy(b), kernels="lowbit",
                         accuracy_level=0)[0] for i, (f, b) in enumerate(zip(fmts, biases))]
    single = "VQMatMul" if kind == "vq" else "BinaryMatMul"
    assert [n.op_type for n in g.nodes] == [single] * len(fmts)  # a bias is the op's last input, not an Add node
    y = fuse_lowbit_linears(g, [f"lin{i}" for i in range(len(fmts))], "fused", gated=gated)
    assert y is not None and [n.op_type for n in g.nodes] == [single.replace("MatMul", "Linears")]
    outs = [y] if gated else outs
    graph = helper.make_graph(g.nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, k])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs], g.inits)
    sess = _run_graph(graph)
    x = np.random.default_rng(5).standard_normal((2, rows, k)).astype(np.float32)
    got = sess.run(None, {"x": x})
    refs = [torch.from_numpy(x) @ f.dequantize().t() + (0 if b is None else torch.from_numpy(b))
            for f, b in zip(fmts, biases)]
    if gated:
        refs = [torch.nn.functional.silu(refs[0]) * refs[1]]
    assert len(got) == len(refs)
    for o, r in zip(got, refs):
        assert o.shape == tuple(r.shape)
        assert np.abs(o - r.numpy()).max() <= 1e-5 * float(r.abs().max())


def test_multi_linear_op_names_the_bad_linear(lib):
    from onnx import TensorProto, helper, numpy_helper

    from lowbit.compiler.lowering.onnx_fuse import fuse_lowbit_linears

    g = GraphBuilder()
    for i in range(2):
        lower_linear(g, "x", _vq(32, 64, 4, 2, 32, perm=False, seed=i), f"lin{i}", kernels="lowbit")
    fuse_lowbit_linears(g, ["lin0", "lin1"], "fused")
    codes = g.nodes[0].input[1 + 7]  # the second linear's codes: one byte short per row
    t = next(t for t in g.inits if t.name == codes)
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t)[:, :-1].copy(), codes))
    graph = helper.make_graph(g.nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in g.nodes[0].output],
                              g.inits)
    sess = _run_graph(graph)
    with pytest.raises(Exception, match="VQLinears: linear 1: codes has 15 bytes per row, expected 16"):
        sess.run(None, {"x": np.zeros((1, 64), np.float32)})


def test_vq_linears_fuse_only_siblings(lib):
    from lowbit.compiler.lowering.onnx_fuse import fuse_lowbit_linears

    g = GraphBuilder()
    lower_linear(g, "x", _vq(16, 32, 4, 2, 16), "a", kernels="lowbit")
    lower_linear(g, "z", _vq(16, 32, 4, 2, 16), "b", kernels="lowbit")  # another input
    assert fuse_lowbit_linears(g, ["a", "b"], "ab") is None and len(g.nodes) == 2
    assert fuse_lowbit_linears(g, ["a", "missing"], "ab") is None


def _billm(n, k, block, salient, outliers, mean_shift, seed=0):
    from lowbit.runtime.formats import BinaryResidual

    gen = torch.Generator().manual_seed(seed)
    sal = torch.zeros(k, dtype=torch.bool)
    sal[torch.randperm(k, generator=gen)[:salient]] = True
    out = torch.zeros(k, dtype=torch.bool)
    if outliers:
        out[torch.nonzero(~sal).flatten()[torch.randperm(int((~sal).sum()), generator=gen)[:outliers]]] = True
    nb = -(-k // block)
    return BinaryResidual.from_planes(
        torch.rand(n, k, generator=gen) > 0.5, torch.rand(n, salient, generator=gen) > 0.5, sal,
        torch.rand(n, k, generator=gen) > 0.7, torch.rand(n, nb, 4, generator=gen) + 0.1,
        torch.randn(n, nb, 4, generator=gen) * 0.1 if mean_shift else None, block,
        out if outliers else None, torch.randn(n, outliers, generator=gen) if outliers else None)


@pytest.mark.parametrize("n,k,block,salient,outliers,mean_shift,rows", [
    (64, 256, 128, 6, 2, False, 1),    # BiLLM b128 with salient and fp16 outlier columns: the vector path
    (70, 512, 64, 10, 0, True, 3),     # mean-shifted, 3 rows of x
    (33, 100, 32, 3, 1, False, 1),     # K not a multiple of 8: the scalar path
    (40, 128, 128, 0, 0, True, 9),     # no salient columns; 9 rows: the dequantized-tile path
    (40, 768, 64, 30, 2, False, 2),    # 12 blocks: salient alphas from two registers
    (24, 1152, 64, 20, 0, False, 1),   # 18 blocks: salient alphas gathered
])
def test_binary_matmul_equals_the_format_reference(lib, n, k, block, salient, outliers, mean_shift, rows):
    fmt = _billm(n, k, block, salient, outliers, mean_shift)
    bias = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    sess, rec = _session(fmt, bias)
    assert rec["rel_err"] == 0.0 and "BinaryMatMul" in rec["lowering"]
    # the group plane spread over all K columns and the salient columns' signs copied compact: 2 x S bits a row
    assert rec["ort_bytes"] <= fmt.nbytes() + n * (2 * -(-salient // 8) + 1)
    x = np.random.default_rng(1).standard_normal((2, rows, k)).astype(np.float32)
    got = sess.run(None, {"x": x})[0]
    ref = (torch.from_numpy(x) @ fmt.dequantize().t() + torch.from_numpy(bias)).numpy()
    assert got.shape == (2, rows, n)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("bits", [5, 6])
def test_vq_pair_table_follows_a_codebook_that_changes(lib, bits):
    """d2b5/d2b6 read codes in pairs through a product table built from the codebook on every call (kept by the node
    instead, it measured no faster: 210 tables of 64 KB evict each other from the caches): a codebook fed as a graph
    input and changed from one call to the next must give the new codebook's product."""
    from onnx import TensorProto, helper, numpy_helper

    fmt = _vq(40, 128, bits, 2, 32, perm=False)
    inits = [numpy_helper.from_array(fmt.codes.numpy(), "codes"), numpy_helper.from_array(fmt.scales.numpy(), "sc")]
    node = helper.make_node("VQMatMul", ["x", "codes", "cb", "sc"], ["y"], domain=ort_ops.DOMAIN, name="vq",
                            index_bits=bits, vec_dim=2, group_size=32)
    graph = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 128]),
                                            helper.make_tensor_value_info("cb", TensorProto.FLOAT16, [1 << bits, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    sess = _run_graph(graph)
    x = np.random.default_rng(2).standard_normal((1, 128)).astype(np.float32)
    for seed in (0, 1, 0):  # a new codebook, then the first again
        cb = torch.randn(1 << bits, 2, generator=torch.Generator().manual_seed(seed)).half()
        ref_fmt = dataclasses.replace(fmt, codebook=cb)
        ref = (torch.from_numpy(x) @ ref_fmt.dequantize().t()).numpy()
        got = sess.run(None, {"x": x, "cb": cb.numpy()})[0]
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_vq_matmul_rejects_inconsistent_inputs(lib):
    from onnx import TensorProto, helper, numpy_helper

    fmt = _vq(32, 64, 4, 2, 32, perm=False)
    inits = [numpy_helper.from_array(fmt.codes.numpy()[:, :-1].copy(), "codes"),  # one byte short per row
             numpy_helper.from_array(fmt.codebook.numpy(), "cb"), numpy_helper.from_array(fmt.scales.numpy(), "sc")]
    node = helper.make_node("VQMatMul", ["x", "codes", "cb", "sc"], ["y"], domain=ort_ops.DOMAIN, name="bad",
                            index_bits=4, vec_dim=2, group_size=32)
    graph = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    sess = _run_graph(graph)
    with pytest.raises(Exception, match="codes has 15 bytes per row, expected 16"):
        sess.run(None, {"x": np.zeros((1, 64), np.float32)})


def _int8_reference(fmt, x):
    """``x @ W.T`` with the regular columns' x rounded as BinaryMatMul does at accuracy_level 4: per row of x and
    block of block_size columns, scale max|x| / 127, round half to even; salient and outlier columns exact."""
    k, bs = fmt.in_features, fmt.block_size
    exact = np.zeros(k, bool)
    exact[fmt.salient_cols.numpy()] = True
    if fmt.outlier_cols is not None:
        exact[fmt.outlier_cols.numpy()] = True
    xr = np.where(exact, 0.0, x).astype(np.float32)
    xq = np.zeros_like(xr)
    for b0 in range(0, k, bs):
        blk = xr[..., b0:b0 + bs]
        mx = np.abs(blk).max(-1, keepdims=True)
        inv = np.where(mx > 0, np.float32(127.0) / np.where(mx > 0, mx, 1), 0).astype(np.float32)
        xq[..., b0:b0 + bs] = np.rint(blk * inv) * (mx / np.float32(127.0))
    w = fmt.dequantize().numpy().astype(np.float64)
    return xq.astype(np.float64) @ w.T + np.where(exact, x, 0.0).astype(np.float64) @ w.T


@pytest.mark.parametrize("n,k,block,salient,outliers,rows", [
    (64, 256, 128, 6, 2, 1),    # b128 with salient and outlier columns, decode's one row
    (70, 576, 128, 9, 3, 3),    # SmolLM2's K: a last block of 64 columns; 3 rows of x
    (33, 512, 64, 0, 0, 2),     # b64, no salient columns
    (48, 1536, 128, 40, 2, 1),  # SmolLM2's down_proj K: 12 blocks
])
def test_binary_matmul_int8_activations_equal_their_reference(lib, n, k, block, salient, outliers, rows):
    """accuracy_level 4: the GEMV rounds the regular columns' x to int8 per block, exactly as stated (the weights
    and the salient and outlier columns exact); more rows than the GEMV takes (a prompt) stay exact."""
    fmt = _billm(n, k, block, salient, outliers, False, seed=3)
    sess, rec = _session(fmt, accuracy_level=4)
    assert "int8" in rec["lowering"] and rec["rel_err"] == 0.0
    exact_sess, _ = _session(fmt)
    x = np.random.default_rng(2).standard_normal((1, rows, k)).astype(np.float32)
    x[..., 5] *= 30.0  # one large channel: its block's other values lose resolution, as stated
    got = sess.run(None, {"x": x})[0].astype(np.float64)
    ref = _int8_reference(fmt, x)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    exact = exact_sess.run(None, {"x": x})[0]
    err = np.abs(got - exact).max() / np.abs(exact).max()
    assert 0 < err < 0.05, err  # rounded (not the exact path), by about int8's resolution
    many = np.random.default_rng(3).standard_normal((1, 9, k)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"x": many})[0], exact_sess.run(None, {"x": many})[0], rtol=0,
                               atol=1e-5 * float(np.abs(exact_sess.run(None, {"x": many})[0]).max()))


def test_binary_linears_keep_each_linears_accuracy_level(lib):
    """A ``BinaryLinears`` node of an int8-activation linear and an exact one computes each as its own op would."""
    from onnx import TensorProto, helper

    from lowbit.compiler.lowering.onnx_fuse import fuse_lowbit_linears

    fmts = [_billm(64, 256, 128, 6, 2, False, seed=1), _billm(40, 256, 64, 3, 0, False, seed=2)]
    g = GraphBuilder()
    outs = [lower_linear(g, "x", f, f"lin{i}", kernels="lowbit", accuracy_level=level)[0]
            for i, (f, level) in enumerate(zip(fmts, (4, 0)))]
    assert fuse_lowbit_linears(g, ["lin0", "lin1"], "fused") is not None
    graph = helper.make_graph(g.nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, 256])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs], g.inits)
    x = np.random.default_rng(4).standard_normal((1, 1, 256)).astype(np.float32)
    y0, y1 = _run_graph(graph).run(None, {"x": x})
    ref0 = _int8_reference(fmts[0], x)
    assert np.abs(y0 - ref0).max() <= 1e-5 * np.abs(ref0).max()
    ref1 = (torch.from_numpy(x) @ fmts[1].dequantize().t()).numpy()
    assert np.abs(y1 - ref1).max() <= 1e-5 * np.abs(ref1).max()


@pytest.mark.parametrize("name,method,op", [
    ("reallm", ["--method", "reallm", "--bits-budget", "3.4", "--reallm-candidates", "d2b4g32r0,d2b5g32r4",
                "--reallm-kmeans-iters", "4"], "VQMatMul"),
    ("billm", ["--method", "billm", "--billm-block-size", "32", "--billm-outlier-ratio", "2"], "BinaryMatMul"),
])
def test_decoder_with_lowbit_kernels_is_exact_and_holds_packed_bytes(lib, tiny_dir, text_file, tmp_path, name, method,
                                                                      op):
    from lowbit.compiler.frontend.cli import compile_main
    from lowbit.compiler.lowering.onnx_artifact import export_artifact
    from lowbit.runtime.artifact import load
    from lowbit.runtime.onnx_runtime import OrtDecoder

    d = tmp_path / name
    assert compile_main([str(tiny_dir("llama")), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "64", "-q",
                         "--float-dtype", "float32", "-o", str(d), *method]) == 0
    s = export_artifact(d, accuracy_level=0, kernels="lowbit", progress=lambda m: None)
    dec_info = s["decoder"]
    assert dec_info["ort_kernels"] == "lowbit" and dec_info["custom_ops"]["domain"] == ort_ops.DOMAIN
    mine = {k: r for k, r in dec_info["layers"].items() if op in r["lowering"]}
    assert len(mine) == len(dec_info["layers"]) and all(r["rel_err"] == 0.0 for r in mine.values())
    # resident = the packed tensors (VQ's int16 permutation read as int32; BiLLM's group plane over all columns and
    # its salient columns' signs copied compact: 1.18x on this tiny model, where salient columns are many): not a
    # grid's 1.6-3.5x
    assert sum(r["ort_bytes"] for r in mine.values()) <= 1.25 * sum(r["packed_bytes"] for r in mine.values())
    m = onnx.load(str(d / "onnx" / "decoder.onnx"), load_external_data=False)
    assert ort_ops.uses_lowbit_ops(m)
    ops = [n.op_type for n in m.graph.node]  # q/k/v and gate/up (with the SiLU gate) as one node each
    layers = s["cache"]["layers"]
    assert ops.count(op.replace("MatMul", "Linears")) == 2 * layers and "QuickGelu" not in ops, ops
    assert dec_info["merged_lowbit_linears"] == 2 * layers
    assert s["check"]["decoder_max_rel_err_vs_torch"] < 1e-4, s["check"]
    art = load(d)
    ids = torch.randint(0, 100, (1, 10))
    ref = art(ids).float()
    dec = OrtDecoder(d / "onnx")
    logits, cache = dec.step(ids[:, :6].numpy(), dec.empty_cache())  # 6 rows: tile path; then 1-row GEMVs
    steps = [logits]
    for t in range(6, 10):
        logits, cache = dec.step(ids[:, t:t + 1].numpy(), cache)
        steps.append(logits)
    full = torch.from_numpy(np.concatenate(steps, 1))
    assert float((full - ref).abs().max() / ref.abs().max()) < 1e-4
    if op == "BinaryMatMul":  # accuracy_level 4: int8 activations in decode, close to torch but not exact
        s = export_artifact(d, accuracy_level=4, kernels="lowbit", overwrite=True, progress=lambda m: None)
        assert all("int8" in r["lowering"] for r in s["decoder"]["layers"].values() if op in r["lowering"])
        dec = OrtDecoder(d / "onnx")
        logits, cache = dec.step(ids[:, :6].numpy(), dec.empty_cache())
        steps = [logits]
        for t in range(6, 10):
            logits, cache = dec.step(ids[:, t:t + 1].numpy(), cache)
            steps.append(logits)
        q8 = torch.from_numpy(np.concatenate(steps, 1))
        assert torch.equal(q8[:, :6], full[:, :6])  # the prompt's rows: the exact tile path
        err = float((q8[:, 6:] - ref[:, 6:]).abs().max() / ref.abs().max())
        assert 0 < err < 0.05, err


def test_without_the_library_a_lowbit_kernel_model_is_refused_clearly(lib, tmp_path, monkeypatch):
    from onnx import TensorProto, helper

    from lowbit.compiler.lowering.onnx_artifact import export_artifact
    from lowbit.runtime.onnx_runtime import OnnxModelError, session

    g = GraphBuilder()
    lower_linear(g, "x", _vq(16, 32, 4, 2, 16), "lin", kernels="lowbit")
    g.nodes[-1].output[0] = "y"
    graph = helper.make_graph(g.nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], g.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(ort_ops.DOMAIN, 1)])
    onnx.save(m, str(tmp_path / "model.onnx"))
    assert session(tmp_path, "model.onnx") is not None
    monkeypatch.setattr(ort_ops, "available", lambda: False)
    with pytest.raises(OnnxModelError, match="model.onnx: .*lowbit.ort.*build-ort-kernels"):
        session(tmp_path, "model.onnx")
    with pytest.raises(LowbitError, match="build-ort-kernels"):
        export_artifact(tmp_path / "no-artifact", kernels="lowbit", progress=lambda m: None)
    monkeypatch.undo()
    with pytest.raises(LowbitError, match="--genai with --ort-kernels lowbit"):
        export_artifact(tmp_path / "no-artifact", kernels="lowbit", genai=True, progress=lambda m: None)
