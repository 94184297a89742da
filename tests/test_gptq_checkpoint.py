"""GPTQ checkpoint layout: independent decoding of what we write, export -> import round trips, refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lowbit.compiler.frontend.cli import compile_main, export_main, import_gptq_main
from lowbit.passes.methods.quant import rtn_quantize
from lowbit.runtime.artifact import load
from lowbit.runtime.gptq_layout import GPTQLayoutError, from_gptq, to_gptq


def _decode_reference(t: dict, bits: int, k: int, version: int) -> torch.Tensor:
    """GPTQ dequantization written from the layout's definition, independent of lowbit's packing code:
    bit p of a column's stream is bit p % 32 of word p // 32."""
    mask = (1 << bits) - 1

    def stream(words: torch.Tensor, count: int) -> torch.Tensor:  # words (W, C) int32 -> codes (count, C)
        w = words.to(torch.int64) & 0xFFFFFFFF
        p = torch.arange(count * bits)
        b = (w[p // 32] >> (p % 32)[:, None]) & 1  # (count*bits, C)
        return (b.view(count, bits, -1) << torch.arange(bits)[None, :, None]).sum(1)

    q = stream(t["qweight"], k)  # (K, N)
    n = t["scales"].shape[1]
    z = stream(t["qzeros"].t().contiguous(), n).t()  # (G, N)
    if version == 1:
        z = (z + 1) & mask
    g = t["g_idx"].long()
    return ((q - z[g]) * t["scales"].float()[g]).t()  # (N, K)


@pytest.mark.parametrize("bits,gs,version", [(2, 32, 1), (3, 32, 1), (4, 16, 2), (8, 64, 1), (4, 48, 1)])
def test_layout_decodes_to_the_same_weight(bits, gs, version):
    torch.manual_seed(bits)
    w = torch.randn(64, 96) * 0.05
    w[:, :gs] = w[:, :gs].abs()  # a group with min >= 0: zero point 0, the v1 wrap-around case
    fmt = rtn_quantize(w, bits, gs, False)
    t, zero_at_0 = to_gptq(fmt, version)
    assert zero_at_0 > 0
    groups = -(-96 // gs)
    assert t["qweight"].dtype == torch.int32 and tuple(t["qweight"].shape) == (96 * bits // 32, 64)
    assert t["qzeros"].dtype == torch.int32 and tuple(t["qzeros"].shape) == (groups, 64 * bits // 32)
    assert t["scales"].dtype == torch.float16 and tuple(t["scales"].shape) == (groups, 64)
    assert t["g_idx"].dtype == torch.int32 and t["g_idx"].tolist() == [i // gs for i in range(96)]
    torch.testing.assert_close(_decode_reference(t, bits, 96, version), fmt.dequantize(), rtol=0, atol=0)
    back = from_gptq(t, bits, gs, version)
    for a, b in zip(back.tensors().values(), fmt.tensors().values()):
        assert (a is None and b is None) or torch.equal(a, b)


def test_layout_refusals():
    w = torch.randn(64, 96)
    with pytest.raises(GPTQLayoutError, match="symmetric"):
        to_gptq(rtn_quantize(w, 4, 32, True))
    with pytest.raises(GPTQLayoutError, match="GPTQ packs"):
        to_gptq(rtn_quantize(w, 5, 32, False))
    with pytest.raises(GPTQLayoutError, match="32-bit words"):
        to_gptq(rtn_quantize(torch.randn(64, 90), 3, 32, False))
    t, _ = to_gptq(rtn_quantize(w, 4, 32, False))
    t["g_idx"] = t["g_idx"].flip(0)
    with pytest.raises(GPTQLayoutError, match="act-order"):
        from_gptq(t, 4, 32)


@pytest.mark.parametrize("method,bits,fmt", [("efficientqat", 2, "v1"), ("rtn", 4, "v2")])
def test_export_import_round_trip_has_identical_logits(tiny_dir, text_file, tmp_path, method, bits, fmt):
    art = tmp_path / "art"
    extra = ["--phases", "block-ap", "--eqat-epochs", "1"] if method == "efficientqat" else []
    assert compile_main([str(tiny_dir("llama")), "--method", method, "--bits", str(bits), "--group-size", "32",
                         "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32", "-q", "-o", str(art),
                         *extra]) == 0
    ck = tmp_path / "gptq"
    assert export_main([str(art), "--gptq", str(ck), "--gptq-format", fmt]) == 0
    cfg = json.loads((ck / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["bits"] == bits and cfg["group_size"] == 32
    assert cfg["desc_act"] is False and cfg["sym"] is False
    assert cfg["checkpoint_format"] == ("gptq" if fmt == "v1" else "gptq_v2")
    assert json.loads((ck / "quantize_config.json").read_text()) == cfg
    t = load_file(str(ck / "model.safetensors"))
    q = "model.layers.0.mlp.down_proj"
    n, k = load(art).formats[q].out_features, load(art).formats[q].in_features
    assert t[f"{q}.qweight"].dtype == torch.int32 and tuple(t[f"{q}.qweight"].shape) == (k * bits // 32, n)
    assert t[f"{q}.scales"].dtype == torch.float16 and f"{q}.weight" not in t
    assert t["model.embed_tokens.weight"].dtype == torch.float16

    back = tmp_path / "back"
    assert import_gptq_main([str(ck), "-o", str(back)]) == 0
    a, b = load(art), load(back)
    ids = torch.randint(0, 200, (2, 11))
    torch.testing.assert_close(b(ids), a(ids), rtol=0, atol=0)
    for name, f in a.formats.items():
        assert torch.equal(f.qweight, b.formats[name].qweight) and torch.equal(f.scales, b.formats[name].scales)


def test_export_refuses_what_gptq_cannot_hold(tiny_dir, text_file, tmp_path, capsys):
    art = tmp_path / "sym"
    assert compile_main([str(tiny_dir("llama")), "--method", "rtn", "--bits", "4", "--group-size", "32", "--sym",
                         "-q", "-o", str(art)]) == 0
    assert export_main([str(art), "--gptq", str(tmp_path / "x")]) == 2
    assert "symmetric" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert import_gptq_main([str(tmp_path / "nothing"), "-o", str(tmp_path / "y")]) == 2
    assert "not found" in capsys.readouterr().err
