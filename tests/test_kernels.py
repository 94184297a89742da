"""Triton kernels vs the eager reference on the same packed weights (CPU: TRITON_INTERPRET=1, small shapes).

On a machine with CUDA the same tests run the compiled kernels on the GPU."""

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from lowbit.kernels import dispatch  # noqa: E402
from lowbit.passes.methods.billm import BiLLMConfig, billm_quantize  # noqa: E402
from lowbit.passes.methods.quant import rtn_quantize  # noqa: E402
from lowbit.runtime.formats import LowRank  # noqa: E402
from lowbit.runtime.ops import affine_linear_from_format, binary_linear_from_format  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 (set by conftest)", allow_module_level=True)


@pytest.mark.parametrize("bits,group,k,sym", [(4, 32, 96, False), (2, 16, 80, False), (3, 32, 70, False),
                                              (8, 64, 64, True), (3, 24, 50, True), (1, 16, 48, False)])
@pytest.mark.parametrize("m", [1, 3, 19])
def test_affine_kernel_matches_reference(bits, group, k, sym, m):
    torch.manual_seed(bits * 100 + k + m)
    n = 37
    fmt = rtn_quantize(torch.randn(n, k), bits, group, sym)
    x = torch.randn(m, k)
    bias = torch.randn(n)
    ref = affine_linear_from_format(x, fmt, bias)
    got = dispatch.affine_linear(x.to(DEV), fmt.qweight.to(DEV), fmt.scales.to(DEV),
                                 None if fmt.zeros is None else fmt.zeros.to(DEV), bias.to(DEV), None, None,
                                 bits, group, k)
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=1e-4)


def test_affine_kernel_low_rank_and_split_k():
    torch.manual_seed(0)
    n, k, r = 20, 2048, 4
    fmt = rtn_quantize(torch.randn(n, k), 4, 128, False)
    fmt.lowrank = LowRank(lora_a=torch.randn(r, k).half(), lora_b=torch.randn(n, r).half())
    assert dispatch.choose(2, n, k, sms=4)[1] > 1  # few columns, long K: split-K is chosen
    x = torch.randn(2, k)
    ref = affine_linear_from_format(x, fmt)
    d = [t.to(DEV) for t in (x, fmt.qweight, fmt.scales, fmt.zeros, fmt.lowrank.lora_a, fmt.lowrank.lora_b)]
    got = dispatch.affine_linear(d[0], d[1], d[2], d[3], None, d[4], d[5], 4, 128, k)
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("cfg", [BiLLMConfig(block_size=32, outlier_ratio=2), BiLLMConfig(block_size=64, mean_shift=True)],
                         ids=["outliers", "mean-shift"])
@pytest.mark.parametrize("m", [1, 17])
def test_binary_kernel_matches_reference(cfg, m):
    torch.manual_seed(m)
    n, k = 29, 150
    xs = torch.randn(512, k)
    xs[:, 5] *= 30
    h = xs.t() @ xs / 512
    fmt, _ = billm_quantize(torch.randn(n, k) * 0.05, h, cfg)
    x = torch.randn(m, k)
    bias = torch.randn(n)
    ref = binary_linear_from_format(x, fmt, bias)
    dev = [None if t is None else t.to(DEV) for t in (x, fmt.signs, fmt.residual_signs, fmt.salient_cols, fmt.group,
                                                         fmt.alphas, fmt.mus, fmt.outlier_cols, fmt.outlier_vals, bias)]
    got = dispatch.binary_linear(*dev, fmt.block_size, fmt.in_features)
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("d,ibits,gs,k,perm,rank", [(2, 5, 32, 96, True, 0), (4, 8, 16, 80, False, 3),
                                                     (1, 3, 24, 50, True, 2), (3, 7, 21, 63, True, 0)])
@pytest.mark.parametrize("m", [1, 19])
def test_vq_kernel_matches_reference(d, ibits, gs, k, perm, rank, m):
    from lowbit.runtime.formats import VQCodebook
    from lowbit.runtime.ops import vq_linear_from_format

    g = torch.Generator().manual_seed(d * 100 + k + m)
    n = 37
    fmt = VQCodebook.from_indices(torch.randint(0, 1 << ibits, (n, k // d), generator=g),
                                  torch.randn(1 << ibits, d, generator=g), torch.rand(n, -(-k // gs), generator=g) + 0.1,
                                  ibits, gs, perm=torch.randperm(k, generator=g) if perm else None,
                                  lowrank=LowRank(torch.randn(rank, k, generator=g), torch.randn(n, rank, generator=g))
                                  if rank else None)
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g)
    ref = vq_linear_from_format(x, fmt, bias)
    lr = fmt.lowrank
    dev = [None if t is None else t.to(DEV) for t in (x, fmt.codes, fmt.codebook, fmt.scales, fmt.perm, bias,
                                                         None if lr is None else lr.lora_a,
                                                         None if lr is None else lr.lora_b)]
    got = dispatch.vq_linear(*dev, ibits, d, gs, k)
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the ops dispatch to Triton on CUDA only")
def test_ops_dispatch_to_triton_on_cuda(monkeypatch):
    fmt = rtn_quantize(torch.randn(64, 256), 4, 64, False)
    x = torch.randn(3, 256)
    ref = affine_linear_from_format(x, fmt)
    for k, v in fmt.tensors().items():
        setattr(fmt, k, v.cuda())
    torch.testing.assert_close(affine_linear_from_format(x.cuda(), fmt).cpu(), ref, rtol=1e-4, atol=1e-4)
    monkeypatch.setenv("LOWBIT_REFERENCE", "1")
    torch.testing.assert_close(affine_linear_from_format(x.cuda(), fmt).cpu(), ref, rtol=1e-4, atol=1e-4)


def test_selection_rule_and_reference_switch(monkeypatch):
    assert dispatch.choose(1, 4096, 4096)[0] == "gemv"
    assert dispatch.choose(128, 4096, 4096) == ("gemm", 1)
    assert dispatch.choose(1, 64, 8192, sms=132)[1] == 8
    assert dispatch.choose(1, 11008, 4096, sms=132)[1] == 1  # 172 column blocks: enough programs
    monkeypatch.setenv("LOWBIT_REFERENCE", "1")
    assert dispatch.reference_forced()
    monkeypatch.setenv("LOWBIT_REFERENCE", "0")
    assert not dispatch.reference_forced()
