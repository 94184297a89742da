"""BiLLM: packed binary-residual format, op, algorithm quality and degenerate input."""

import pytest
import torch

from lowbit.passes.methods import build_method
from lowbit.passes.methods.billm import BiLLMConfig, billm_quantize, binarize
from lowbit.runtime.formats import BinaryResidual
from lowbit.runtime.ops import binary_linear_from_format


def _layer(n=48, k=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(2048, k // 4, generator=g) @ torch.randn(k // 4, k, generator=g)
    x = base + 0.2 * torch.randn(2048, k, generator=g) * torch.rand(k, generator=g) * 3
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, 7] *= 8  # a salient column
    return x, w, 2 * x.t() @ x / x.shape[0]


VARIANTS = [BiLLMConfig(block_size=128), BiLLMConfig(block_size=64, search_rows=0),
            BiLLMConfig(block_size=32, mean_shift=True, search_on="s", search_ranges="code")]


@pytest.mark.parametrize("cfg", VARIANTS, ids=lambda c: c.tag())
def test_billm_beats_naive_sign_and_op_matches_reference(cfg):
    x, w, h = _layer()
    fmt, info = billm_quantize(w, h, cfg)
    deq = fmt.dequantize()

    def err(wq):
        return float((x @ (wq - w).t()).pow(2).mean())

    naive = torch.sign(w) * w.abs().mean(1, keepdim=True)
    assert err(deq) < 0.6 * err(naive)
    assert info["salient_columns"] >= 1
    assert 7 in fmt.salient_cols.tolist()
    # op == dequantize-then-matmul on the packed tensors; opcheck the op
    xx = torch.randn(3, 5, w.shape[1])
    bias = torch.randn(w.shape[0])
    torch.testing.assert_close(binary_linear_from_format(xx, fmt, bias), xx @ deq.t() + bias, rtol=1e-4, atol=1e-4)
    torch.library.opcheck(torch.ops.lowbit.binary_linear.default,
                          (xx, fmt.signs, fmt.residual_signs, fmt.salient_cols, fmt.group, fmt.alphas, fmt.mus,
                           fmt.outlier_cols, fmt.outlier_vals, bias, fmt.block_size, fmt.in_features))
    # bits: the paper's count is 1 + salient fraction; true storage matches the tensors exactly
    assert abs(fmt.paper_bits_per_weight() - (1 + info["salient_columns"] / w.shape[1])) < 1e-9
    # true storage from the layout alone: sign plane, residual plane of the S salient columns, their int32
    # indices, the group bitmap of the K-S others, fp16 alphas (and mus) per row-block and part, fp16 outliers
    n, k, s_, r_ = w.shape[0], w.shape[1], info["salient_columns"], info["outlier_columns"]
    blocks = -(-k // cfg.block_size)
    want = n * -(-k // 8) + n * -(-s_ // 8) + 4 * s_ + n * -(-(k - s_) // 8) + 2 * n * blocks * 4
    want += (2 * n * blocks * 4 if cfg.mean_shift else 0) + (4 * r_ + 2 * n * r_ if r_ else 0)
    assert fmt.nbytes() == want
    # round trip through tensors/meta
    again = BinaryResidual.from_tensors(fmt.meta(), fmt.tensors())
    assert torch.equal(again.dequantize(), deq)


def test_outlier_columns_keep_massive_activation_channels():
    """A channel with activations 1000x the others (an attention sink) ruins a binarized layer unless its
    column is kept in fp16; the extension finds it from the Hessian and stores it exactly."""
    x, w, _ = _layer(n=40, k=160, seed=1)
    x[:, 33] *= 1000
    h = 2 * x.t() @ x / x.shape[0]

    def err(f):
        return float((x @ (f.dequantize() - w).t()).pow(2).mean() / (x @ w.t()).pow(2).mean())

    paper, info0 = billm_quantize(w, h, BiLLMConfig(block_size=64, outlier_ratio=0))
    ext, info1 = billm_quantize(w, h, BiLLMConfig(block_size=64))
    assert info0["outlier_columns"] == 0 and paper.outlier_cols is None
    assert ext.outlier_cols.tolist() == [33] and info1["outlier_columns"] == 1
    assert err(ext) < 0.1 * err(paper)
    torch.testing.assert_close(ext.dequantize()[:, 33], ext.outlier_vals[:, 0].float())
    # honest bits: the fp16 column is counted in both the true and the paper count
    assert ext.nbytes() - paper.nbytes() >= 40 * 2 + 4
    assert ext.paper_bits_per_weight() == pytest.approx(1 + (info1["salient_columns"] + 15) / 160)
    again = BinaryResidual.from_tensors(ext.meta(), ext.tensors())
    assert torch.equal(again.dequantize(), ext.dequantize())
    xx = torch.randn(2, 3, 160)
    torch.testing.assert_close(binary_linear_from_format(xx, ext), xx @ ext.dequantize().t(), rtol=1e-4, atol=1e-4)
    torch.library.opcheck(torch.ops.lowbit.binary_linear.default,
                          (xx, ext.signs, ext.residual_signs, ext.salient_cols, ext.group, ext.alphas, ext.mus,
                           ext.outlier_cols, ext.outlier_vals, None, ext.block_size, ext.in_features))
    # a header that disagrees with the tensors is refused
    meta = dict(ext.meta(), num_outliers=2)
    with pytest.raises(ValueError, match="outlier_cols"):
        BinaryResidual.from_tensors(meta, ext.tensors())
    broken = dict(ext.tensors())
    del broken["outlier_vals"]
    with pytest.raises(ValueError, match="together"):
        BinaryResidual.from_tensors(ext.meta(), broken)


def test_binarize_matches_definition():
    w = torch.tensor([[1.0, 3.0, -2.0, 10.0]])
    mask = torch.tensor([[True, True, True, False]])
    b, a, mu = binarize(w, mask, True)
    assert mu.item() == pytest.approx(2 / 3)
    assert a.item() == pytest.approx((abs(1 - 2 / 3) + abs(3 - 2 / 3) + abs(-2 - 2 / 3)) / 3)
    assert b[0, 3] == 0
    b0, a0, mu0 = binarize(w, mask, False)
    assert mu0.item() == 0 and a0.item() == pytest.approx(2.0)


def test_degenerate_weights_and_hessians_stay_finite():
    x, w, h = _layer(n=16, k=64)
    w[3] = 0  # zero row
    w[5] = 0.7  # constant row
    h[9, :] = 0
    h[:, 9] = 0  # a column with zero Hessian diagonal
    fmt, info = billm_quantize(w, h, BiLLMConfig(block_size=32))
    deq = fmt.dequantize()
    assert torch.isfinite(deq).all()
    assert torch.all(deq[3] == 0)
    assert info["dead_inputs"] == 1
    zero, _ = billm_quantize(torch.zeros(8, 64), h, BiLLMConfig(block_size=32))
    assert torch.all(zero.dequantize() == 0)
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        billm_quantize(bad, h, BiLLMConfig(block_size=32))
    hn = h.clone()
    hn[1, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        billm_quantize(w, hn, BiLLMConfig(block_size=32))


def test_billm_options_validated():
    with pytest.raises(ValueError, match="block-size"):
        build_method("billm", block_size=100)
    with pytest.raises(ValueError, match="outlier-ratio"):
        build_method("billm", outlier_ratio=-1)
    with pytest.raises(ValueError, match="search-on"):
        build_method("billm", search_on="x")
    with pytest.raises(ValueError, match="does not take"):
        build_method("billm", bits=2)
