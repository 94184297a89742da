"""The directly built decoder (fused ORT ops, genai names) matches the torch program, for every format; BiLLM's
lowering is exact; VQ's grid error is measured; a compressed tied head carries the embedding (packed, one table)
in torch and in ONNX Runtime."""

import json

import numpy as np
import onnx
import pytest
import torch

from lowbit.compiler.frontend.cli import compile_main
from lowbit.compiler.lowering.onnx_artifact import export_artifact
from lowbit.compiler.lowering.onnx_graph import GraphBuilder
from lowbit.compiler.lowering.ort_linears import lower_linear
from lowbit.runtime.artifact import load
from lowbit.runtime.onnx_runtime import OrtDecoder


def _compile(tiny_dir, text_file, out, *method, overrides=None):
    argv = [str(tiny_dir("llama")), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "64", "-q",
            "--float-dtype", "float32", "-o", str(out), *method]
    if overrides:
        p = out.parent / (out.name + ".toml")
        p.write_text(overrides)
        argv += ["--overrides", str(p)]
    assert compile_main(argv) == 0
    return out


def _linear_graph(fmt, k, accuracy_level=0, binary="grid", vq_lowrank="fold", grid_bits=4):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    g = GraphBuilder()
    y, rec = lower_linear(g, "x", fmt, "lin", accuracy_level=accuracy_level, max_block=None, vq_block=16,
                          binary=binary, vq_lowrank=vq_lowrank, grid_bits=grid_bits)
    g.nodes[-1].output[0] = "y"
    graph = helper.make_graph(g.nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], g.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]), rec


def _billm_format():
    from lowbit.runtime.formats import BinaryResidual

    torch.manual_seed(0)
    n, k, bs = 48, 288, 64  # K not a multiple of the block: the last block is partial
    salient = torch.zeros(k, dtype=torch.bool)
    salient[torch.tensor([3, 5, 70, 130, 131, 132, 200])] = True
    outliers = torch.zeros(k, dtype=torch.bool)
    outliers[[10, 150]] = True
    fmt = BinaryResidual.from_planes(torch.rand(n, k) > 0.5, torch.rand(n, int(salient.sum())) > 0.5, salient,
                                     torch.rand(n, k) > 0.7, torch.rand(n, -(-k // bs), 4) + 0.1, None, bs,
                                     outliers=outliers, outlier_vals=torch.randn(n, 2))
    return fmt, k


def test_billm_exact_lowering_is_exact():
    fmt, k = _billm_format()
    sess, rec = _linear_graph(fmt, k, binary="exact")
    x = torch.randn(2, 5, k)
    ref = x @ fmt.dequantize().t()
    got = torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5
    assert rec["rel_err"] == 0.0 and "exact" in rec["lowering"]


def test_billm_grid_lowering_error_is_measured_and_small():
    fmt, k = _billm_format()
    sess, rec = _linear_graph(fmt, k)
    x = torch.randn(2, 5, k)
    ref = x @ fmt.dequantize().t()
    got = torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])
    err = float((got - ref).norm() / ref.norm())
    assert 0 < rec["rel_err"] < 0.15 and "grid" in rec["lowering"]
    assert err < 2 * rec["rel_err"] + 1e-3
    assert rec["ort_bytes"] < 2 * rec["packed_bytes"], rec  # 4 bits + block scales for the format's ~2.5


def test_vq_lowering_records_its_grid_error():
    from lowbit.runtime.formats import VQCodebook

    torch.manual_seed(0)
    n, k = 32, 64
    fmt = VQCodebook.from_indices(torch.randint(0, 16, (n, k // 2)), torch.randn(16, 2), torch.rand(n, k // 32) + 0.5,
                                  4, 32, perm=torch.randperm(k))
    sess, rec = _linear_graph(fmt, k)
    x = torch.randn(2, 3, k)
    ref = x @ fmt.dequantize().t()
    got = torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])
    err = float((got - ref).norm() / ref.norm())
    assert 0 < rec["rel_err"] < 0.1  # a 4-bit grid per 16 columns: a real, measured, small error
    assert err < 3 * rec["rel_err"] + 1e-3


def test_an_8_bit_value_grid_cuts_the_error_for_its_bytes():
    """--value-grid-bits 8: VQ values x scales and BiLLM's levels on a 256-level grid, 8-bit MatMulNBits: the
    recorded weight error and the output error fall more than 8x, the bytes held roughly double."""
    from lowbit.runtime.formats import VQCodebook

    torch.manual_seed(0)
    n, k = 32, 64
    vq = VQCodebook.from_indices(torch.randint(0, 16, (n, k // 2)), torch.randn(16, 2), torch.rand(n, k // 32) + 0.5,
                                 4, 32, perm=torch.randperm(k))
    for fmt, k in ((vq, k), _billm_format()):
        x = torch.randn(2, 3, k)
        ref = x @ fmt.dequantize().t()
        res = {}
        for bits in (4, 8):
            sess, rec = _linear_graph(fmt, k, grid_bits=bits)
            got = torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])
            res[bits] = (rec, float((got - ref).norm() / ref.norm()))
            assert f"{bits}-bit grid" in rec["lowering"]
        (r4, e4), (r8, e8) = res[4], res[8]
        assert 0 < r8["rel_err"] < r4["rel_err"] / 8 and e8 < e4 / 8, (type(fmt).__name__, r4, r8, e4, e8)
        assert 1.5 < r8["ort_bytes"] / r4["ort_bytes"] < 2.2
    with pytest.raises(ValueError, match="4 or 8 bits"):
        lower_linear(GraphBuilder(), "x", vq, "lin", grid_bits=6)


def _affine_lowrank(n, k, rank, seed):
    from lowbit.runtime.formats import AffineIntK, LowRank

    g = torch.Generator().manual_seed(seed)
    lr = None if rank == 0 else LowRank((torch.randn(rank, k, generator=g) * 0.1).half(),
                                        (torch.randn(n, rank, generator=g) * 0.1).half())
    return AffineIntK.from_codes(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8),
                                 torch.rand(n, k // 32, generator=g) + 0.1,
                                 torch.randint(0, 16, (n, k // 32), generator=g, dtype=torch.uint8), 4, 32, lowrank=lr)


def test_vq_lowrank_fold_joins_the_grid():
    """A VQ layer's low-rank term folded into the 4-bit grid: no MatMul pair, the output within the recorded
    error of the format's full weight (low-rank included), as close as the exact pair's lowering."""
    from lowbit.runtime.formats import LowRank, VQCodebook

    torch.manual_seed(1)
    n, k = 32, 64
    lr = LowRank(torch.randn(4, k) * 0.05, torch.randn(n, 4) * 0.05)
    fmt = VQCodebook.from_indices(torch.randint(0, 16, (n, k // 2)), torch.randn(16, 2), torch.rand(n, k // 32) + 0.5,
                                  4, 32, perm=torch.randperm(k), lowrank=lr)
    x = torch.randn(2, 3, k)
    ref = x @ fmt.dequantize().t()
    errs = {}
    for mode in ("fold", "exact"):
        g = GraphBuilder()
        lower_linear(g, "x", fmt, "lin", accuracy_level=0, max_block=None, vq_block=16, vq_lowrank=mode)
        assert sum(nd.op_type == "MatMul" for nd in g.nodes) == (0 if mode == "fold" else 2)
        sess, rec = _linear_graph(fmt, k, vq_lowrank=mode)
        got = torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])
        errs[mode] = float((got - ref).norm() / ref.norm())
        assert 0 < rec["rel_err"] < 0.1 and errs[mode] < 3 * rec["rel_err"] + 1e-3
    assert errs["fold"] < 1.5 * errs["exact"] + 1e-3


@pytest.mark.parametrize("ranks", [(4, 4, 8), (4, 0, 4)])
def test_merged_siblings_keep_their_low_rank_terms(ranks):
    """q/k/v-like siblings with low-rank branches (ApiQ, ReALLM; one without): one MatMulNBits, one low-rank
    pair (block-diagonal B) and one Add, and the same outputs as one node chain per linear."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from lowbit.compiler.lowering.onnx_fuse import fuse_matmulnbits, merge_side_terms

    k = 64
    fmts = [_affine_lowrank(n, k, r, i) for i, (n, r) in enumerate(zip((48, 16, 16), ranks))]
    outs = []
    for merge in (False, True):
        g = GraphBuilder()
        ys = [lower_linear(g, "x", f, f"lin{i}", accuracy_level=0, max_block=None)[0] for i, f in enumerate(fmts)]
        if merge:
            fused = fuse_matmulnbits(g, ["lin0", "lin1", "lin2"], "merged")
            assert fused is not None
            merge_side_terms(g, fused, "merged")
            assert sum(n.op_type == "MatMul" for n in g.nodes) == 2  # one low-rank pair for all three
            assert sum(n.op_type == "MatMulNBits" for n in g.nodes) == 1
        names = [f"y{i}" for i in range(3)]
        g.nodes += [helper.make_node("Identity", [y], [n]) for y, n in zip(ys, names)]
        graph = helper.make_graph(g.nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                                  [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names], g.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.microsoft", 1)])
        m.ir_version = 10
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {"x": np.random.default_rng(0).standard_normal((3, k)).astype(np.float32)}))
    for a, b, f in zip(*outs, fmts):
        assert a.shape == b.shape == (3, f.out_features)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


@pytest.mark.parametrize("name,method", [
    ("w4g32", ["--method", "rtn", "--bits", "4", "--group-size", "32"]),
    ("w3g32-sym", ["--method", "rtn", "--bits", "3", "--group-size", "32", "--sym"]),
    pytest.param("w4g32-sym", ["--method", "rtn", "--bits", "4", "--group-size", "32", "--sym"],
                 marks=pytest.mark.slow),  # the doubled symmetric path is w3g32-sym's too
    ("billm", ["--method", "billm", "--billm-block-size", "32", "--billm-outlier-ratio", "2"]),  # exact planes
    ("billm-grid", ["--method", "billm", "--billm-block-size", "32", "--billm-outlier-ratio", "2"]),
    ("reallm", ["--method", "reallm", "--bits-budget", "3.4", "--reallm-candidates", "d2b4g32r0,d2b5g32r4",
                "--reallm-kmeans-iters", "4"]),
])
def test_direct_decoder_matches_torch(tiny_dir, text_file, tmp_path, name, method):
    d = _compile(tiny_dir, text_file, tmp_path / name, *method)
    grid = 8 if name == "reallm" else 4  # VQ values on the 8-bit grid (BiLLM's grid case keeps the 4-bit one)
    s = export_artifact(d, accuracy_level=0, binary="exact" if name == "billm" else "grid", grid_bits=grid,
                        progress=lambda m: None)
    assert s["decoder"]["builder"].startswith("direct") and s["decoder"]["value_grid_bits"] == grid
    if name in ("reallm", "billm-grid"):
        assert all(f"{grid}-bit grid" in r["lowering"] for r in s["decoder"]["layers"].values())
    m = onnx.load(str(d / "onnx" / "decoder.onnx"), load_external_data=False)
    ops = {n.op_type for n in m.graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "MatMulNBits"} <= ops
    assert [i.name for i in m.graph.input[:3]] == ["input_ids", "attention_mask", "past_key_values.0.key"]
    used = {x for n in m.graph.node for x in n.input}
    assert [t.name for t in m.graph.initializer if t.name not in used] == []  # ORT would warn and drop them
    if name in ("w4g32", "w3g32-sym", "billm-grid"):  # q/k/v and gate/up each one MatMulNBits (onnx_fuse)
        assert s["decoder"]["merged_matmulnbits"] == 2 * s["cache"]["layers"]
        gqa = [n for n in m.graph.node if n.op_type == "GroupQueryAttention"]
        assert all(n.input[1] == "" for n in gqa)  # packed QKV (BiLLM: its outlier terms merged before it)
        if name == "billm-grid":  # outlier columns: one Gather/MatMul/Add per input (q/k/v, o, gate/up, down)
            side = [n for n in m.graph.node if n.op_type == "MatMul" and "outliers" in n.name]
            assert 0 < len(side) <= 4 * s["cache"]["layers"]
        _assert_fusion_is_exact(d, tmp_path / f"{name}-unfused.onnx", grid)
    if name == "w4g32-sym":  # integer zero points (ORT's float zero points take a ~100x slower path)
        assert all(r["lowering"] == "MatMulNBits 8-bit block 32 (codes doubled: symmetric)"
                   for r in s["decoder"]["layers"].values()), s["decoder"]["layers"]
    worst = max(r["rel_err"] for r in s["decoder"]["layers"].values())
    tol = 1e-4 if worst == 0 else 0.2 + 4 * worst  # grid lowerings (VQ, BiLLM grid): bounded by their own error
    assert s["check"]["decoder_max_rel_err_vs_torch"] < tol, s["check"]
    # incremental decoding equals one full pass
    art = load(d)
    ids = torch.randint(0, 100, (1, 10))
    ref = art(ids).float()
    dec = OrtDecoder(d / "onnx")
    logits, cache = dec.step(ids[:, :6].numpy(), dec.empty_cache())
    logits2, _ = dec.step(ids[:, 6:].numpy(), cache)
    full = torch.from_numpy(np.concatenate([logits, logits2], 1))
    assert float((full - ref).abs().max() / ref.abs().max()) < tol
    # generation with one key/value buffer per layer written in place picks the tokens that steps concatenating
    # the cache pick
    prompt = ids[0, :6].tolist()
    assert dec.generate(prompt, 12)[0] == _greedy_by_steps(dec, prompt, 12)


def _greedy_by_steps(dec, prompt, n):
    logits, cache = dec.step(np.array([prompt]), dec.empty_cache())
    out = []
    for _ in range(n):
        out.append(int(logits[0, -1].argmax()))
        logits, cache = dec.step(np.array([[out[-1]]]), cache)
    return out


def _assert_fusion_is_exact(d, unfused_path, grid_bits):
    """The decoder with q/k/v and gate/up merged gives the same logits as one node per linear."""
    import onnxruntime as ort

    from lowbit.compiler.lowering.onnx_llama import build_decoder

    build_decoder(load(d), unfused_path, accuracy_level=0, max_block=None, fuse=False, grid_bits=grid_bits)
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
                for p in (d / "onnx" / "decoder.onnx", unfused_path)]
    assert len(sessions[0].get_inputs()) == len(sessions[1].get_inputs())
    feeds = {}
    for i in sessions[1].get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = np.array([[3, 14, 15, 92, 65]], np.int64)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((1, 5), np.int64)
        else:  # an empty cache (batch, kv_heads, 0, head_dim)
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    a, b = (s.run(["logits"], feeds)[0] for s in sessions)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    assert len(onnx.load(str(unfused_path), load_external_data=False).graph.node) > \
        len(onnx.load(str(d / "onnx" / "decoder.onnx"), load_external_data=False).graph.node)


def test_tied_packed_head_carries_the_embedding(tiny_dir, text_file, tmp_path):
    d = _compile(tiny_dir, text_file, tmp_path / "head4", "--method", "rtn", "--bits", "4", "--group-size", "32",
                 overrides='[[rule]]\nmatch = "lm_head"\nbits = 4\ngroup_size = 16\n')
    art = load(d)
    targets = [str(n.target) for n in art.program.graph.nodes if n.op == "call_function"]
    assert "lowbit.affine_embedding.default" in targets and "aten.embedding.default" not in targets
    assert not any("lm_head.weight" in k or "embed_tokens" in k for k in art.program.state_dict), \
        "the float table must be gone: the packed head is the only copy"
    # the torch program's embedding rows are exactly the head's dequantized rows
    ids = torch.tensor([[1, 5, 7]])
    rows = torch.ops.lowbit.affine_embedding(ids, *(art.formats["lm_head"].tensors()[k] for k in
                                                    ("qweight", "scales", "zeros")), 4, 16, 64)
    assert torch.equal(rows[0], art.formats["lm_head"].dequantize()[ids[0]])
    # the MLIR path's decomposition (aten ops only) computes the same lookup
    from lowbit.passes.base import PassContext
    from lowbit.passes.decompose import DecomposeLowbitOps

    gm = art.program.module()
    ref = gm(ids)
    rep = DecomposeLowbitOps().run(gm, PassContext())
    assert rep.changed.get("affine_embedding") == 1
    assert torch.allclose(gm(ids), ref, rtol=1e-5, atol=1e-5)
    s = export_artifact(d, accuracy_level=0, progress=lambda m: None)
    assert "GatherBlockQuantized" in s["decoder"]["head"]["embedding"]
    assert s["decoder"]["head"]["kind"] == "packed"
    assert s["check"]["decoder_max_rel_err_vs_torch"] < 1e-4
    assert s["check"]["max_rel_err_vs_torch"] < 1e-4  # the traced prefill graph too (GatherBlockQuantized)
    m = onnx.load(str(d / "onnx" / "decoder.onnx"), load_external_data=False)
    big_float = [t.name for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT
                 and int(np.prod(t.dims)) >= 64 * 128]
    assert not big_float, big_float
    meta = json.loads((d / "onnx" / "export.json").read_text())
    assert meta["decoder"]["ort_weight_bytes"] < 2 * meta["decoder"]["packed_bytes"]


def test_genai_folder_generates_the_same_tokens(tiny_dir, text_file, tmp_path):
    pytest.importorskip("onnxruntime_genai")
    from lowbit.compiler.frontend.cli import export_main
    from lowbit.compiler.lowering.onnx_genai import genai_generate

    d = _compile(tiny_dir, text_file, tmp_path / "g", "--method", "rtn", "--bits", "4", "--group-size", "32")
    assert export_main([str(d), "--onnx", "--genai", "--accuracy-level", "0", "--outlier-data", "none"]) == 0
    meta = json.loads((d / "onnx" / "export.json").read_text())
    assert "genai_config.json" in meta["files"] and "tokenizer.json" in meta["files"]
    ids = [5, 17, 33, 2, 9]
    ours, _, _ = OrtDecoder(d / "onnx").generate(ids, 16)
    theirs = genai_generate(d / "onnx", ids, 16)
    assert len(theirs) >= 1 and theirs == ours[: len(theirs)]


def test_head_option_compresses_head_and_embedding(tiny_dir, text_file, tmp_path):
    d = _compile(tiny_dir, text_file, tmp_path / "h8", "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--head", "8")
    art = load(d)
    head = art.formats["lm_head"]
    assert head.bits == 8 and head.group_size == 32
    targets = [str(n.target) for n in art.program.graph.nodes if n.op == "call_function"]
    assert "lowbit.affine_embedding.default" in targets
    # a user rule naming lm_head wins over --head
    d2 = _compile(tiny_dir, text_file, tmp_path / "h4rule", "--method", "rtn", "--bits", "4", "--group-size", "32",
                  "--head", "8", overrides='[[rule]]\nmatch = "lm_head"\nbits = 4\ngroup_size = 16\n')
    assert load(d2).formats["lm_head"].bits == 4
