"""The lowbit::affine_linear op: opcheck, reference semantics, autograd, export."""

import pytest
import torch

from lowbit.passes.methods.quant import rtn_quantize
from lowbit.runtime.formats import AffineIntK, LowRank, dequantize_affine
from lowbit.runtime.ops import affine_linear_from_format


def _fmt(n, k, bits, gs, sym, rank=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    f = rtn_quantize(w, bits, gs, sym)
    if rank:
        f.lowrank = LowRank(torch.randn(rank, k, generator=g).half() * 0.1, torch.randn(n, rank, generator=g).half() * 0.1)
    return w, f


CASES = [(5, 37, 3, 16, False, 0), (8, 64, 4, 32, True, 0), (6, 576 // 8, 2, 64, False, 2), (3, 29, 1, 8, True, 0),
         (4, 40, 8, 128, False, 3), (7, 33, 5, 10, False, 0)]


@pytest.mark.parametrize("n,k,bits,gs,sym,rank", CASES)
def test_opcheck(n, k, bits, gs, sym, rank):
    _, f = _fmt(n, k, bits, gs, sym, rank)
    x = torch.randn(2, 3, k)
    bias = torch.randn(n)
    lr = f.lowrank
    args = (x, f.qweight, f.scales, f.zeros, bias, None if lr is None else lr.lora_a,
            None if lr is None else lr.lora_b, bits, gs, k)
    torch.library.opcheck(torch.ops.lowbit.affine_linear.default, args)


@pytest.mark.parametrize("n,k,bits,gs,sym,rank", CASES)
def test_reference_matches_dequantize_then_matmul(n, k, bits, gs, sym, rank):
    _, f = _fmt(n, k, bits, gs, sym, rank)
    x = torch.randn(4, k)
    # Independent dequantization straight from the definition W = s * (q - z), groups of gs columns.
    q = f.codes().float()
    z = f.zero_points()
    s = f.scales.float()
    gi = torch.arange(k) // gs
    w = s[:, gi] * (q - z[:, gi])
    if rank:
        w = w + f.lowrank.lora_b.float() @ f.lowrank.lora_a.float()
    torch.testing.assert_close(affine_linear_from_format(x, f), x @ w.t(), rtol=1e-4, atol=1e-4)


def test_rtn_error_shrinks_with_bits_and_ragged_last_group():
    w = torch.randn(16, 576)
    errs = []
    for bits in range(1, 9):
        f = rtn_quantize(w, bits, 128, False)  # 576 = 4*128 + 64: last group is short
        assert f.scales.shape == (16, 5)
        errs.append(float((f.dequantize() - w).pow(2).mean()))
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-4


def test_symmetric_one_bit_is_sign_times_scale():
    w = torch.tensor([[0.5, -0.25, 0.1, -0.5]])
    f = rtn_quantize(w, 1, 4, True)
    assert f.zeros is None
    assert torch.equal(torch.sign(f.dequantize()), torch.sign(w))


def test_autograd_through_packed_weight():
    _, f = _fmt(6, 20, 4, 8, False)
    x = torch.randn(3, 20, requires_grad=True)
    affine_linear_from_format(x, f).sum().backward()
    w = f.dequantize()
    torch.testing.assert_close(x.grad, torch.ones(3, 6) @ w)


def test_format_validation_names_the_tensor():
    _, f = _fmt(4, 16, 4, 8, False)
    bad = dict(f.tensors())
    bad["scales"] = bad["scales"][:, :1]
    with pytest.raises(ValueError, match="scales: expected"):
        AffineIntK.from_tensors(f.meta(), bad)


def test_export_keeps_op_and_dynamic_batch():
    _, f = _fmt(6, 20, 4, 8, False)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for k_, v in f.tensors().items():
                self.register_buffer(k_, v)

        def forward(self, x):
            return torch.ops.lowbit.affine_linear(x, self.qweight, self.scales, self.zeros, None, None, None, 4, 8, 20)

    ep = torch.export.export(M(), (torch.randn(2, 20),), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    assert any(n.target == torch.ops.lowbit.affine_linear.default for n in ep.graph.nodes)
    x = torch.randn(5, 20)
    torch.testing.assert_close(ep.module()(x), x @ dequantize_affine(f.qweight, f.scales, f.zeros, 4, 8, 20).t())
