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
@pytest.mark.parametrize("m", [1, 3, 8, 19])
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


@pytest.mark.parametrize("m", [1, 2])
def test_affine_kernel_low_rank_and_split_k(m):
    """Split-K (partial sums added after the launch, epilogue applied then) with bias and low-rank branch."""
    torch.manual_seed(m)
    n, k, r = 20, 2100, 4  # K not a multiple of the split slices
    fmt = rtn_quantize(torch.randn(n, k), 4, 128, False)
    fmt.lowrank = LowRank(lora_a=torch.randn(r, k).half(), lora_b=torch.randn(n, r).half())
    assert dispatch.choose(m, n, k, sms=4)[1] > 1  # few columns, long K: split-K is chosen
    x, bias = torch.randn(m, 3, k)[:, 0], torch.randn(n)  # a non-contiguous input
    ref = affine_linear_from_format(x, fmt, bias)
    d = [t.to(DEV) for t in (x, fmt.qweight, fmt.scales, fmt.zeros, bias, fmt.lowrank.lora_a, fmt.lowrank.lora_b)]
    got = dispatch.affine_linear(*d, 4, 128, k)
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 24])
def test_kernels_half_activations_keep_dtype(dtype, m):
    """fp16 / bf16 activations: tensor-core dot in that precision (GEMM), output stored in that dtype."""
    if DEV == "cpu" and dtype == torch.bfloat16 and m > 8:
        pytest.skip("Triton 3.x's interpreter computes bf16 tl.dot wrongly (errors ~1e10 on a plain 16x16 product); "
                    "the bf16 GEMM runs on a GPU")
    torch.manual_seed(m)
    n, k = 40, 192
    fmt = rtn_quantize(torch.randn(n, k), 4, 64, False)
    fmt.lowrank = LowRank(lora_a=torch.randn(2, k).half() * 0.1, lora_b=torch.randn(n, 2).half() * 0.1)
    x, bias = torch.randn(1, m, k), torch.randn(n)
    ref = affine_linear_from_format(x, fmt, bias)
    d = [t.to(DEV) for t in (x.to(dtype), fmt.qweight, fmt.scales, fmt.zeros, bias.to(dtype),
                             fmt.lowrank.lora_a, fmt.lowrank.lora_b)]
    got = dispatch.affine_linear(*d, 4, 64, k)
    assert got.dtype == dtype and got.shape == (1, m, n)
    tol = 2e-2 if dtype == torch.float16 else 1e-1
    torch.testing.assert_close(got.cpu().float(), ref, rtol=tol, atol=tol * 4)


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


def test_binary_and_vq_kernels_split_k():
    """Split-K for the binary (outlier columns added after the partial sums) and VQ (low-rank) kernels."""
    from lowbit.runtime.formats import VQCodebook
    from lowbit.runtime.ops import vq_linear_from_format

    torch.manual_seed(0)
    n, k = 24, 2112
    assert dispatch.choose(1, n, k, sms=4)[1] > 1
    xs = torch.randn(256, k)
    xs[:, [7, 900]] *= 30  # massive channels: kept as fp16 outlier columns
    fmt, _ = billm_quantize(torch.randn(n, k) * 0.05, xs.t() @ xs / 256, BiLLMConfig(block_size=128, outlier_ratio=2))
    assert fmt.outlier_cols is not None and fmt.outlier_cols.numel()
    x, bias = torch.randn(1, k), torch.randn(n)
    ref = binary_linear_from_format(x, fmt, bias)
    dev = [None if t is None else t.to(DEV) for t in (x, fmt.signs, fmt.residual_signs, fmt.salient_cols, fmt.group,
                                                         fmt.alphas, fmt.mus, fmt.outlier_cols, fmt.outlier_vals, bias)]
    torch.testing.assert_close(dispatch.binary_linear(*dev, fmt.block_size, k).cpu(), ref, rtol=1e-4, atol=1e-3)

    g = torch.Generator().manual_seed(1)
    vq = VQCodebook.from_indices(torch.randint(0, 64, (n, k // 2), generator=g), torch.randn(64, 2, generator=g),
                                 torch.rand(n, k // 64, generator=g) + 0.1, 6, 64, perm=torch.randperm(k, generator=g),
                                 lowrank=LowRank(torch.randn(3, k, generator=g), torch.randn(n, 3, generator=g)))
    ref = vq_linear_from_format(x, vq, bias)
    lr = vq.lowrank
    dev = [t.to(DEV) for t in (x, vq.codes, vq.codebook, vq.scales, vq.perm, bias, lr.lora_a, lr.lora_b)]
    torch.testing.assert_close(dispatch.vq_linear(*dev, 6, 2, 64, k).cpu(), ref, rtol=1e-4, atol=2e-3)
