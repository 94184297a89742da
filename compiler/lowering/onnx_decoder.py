"""Decoder graph with a key/value cache, for incremental generation in ONNX Runtime.

``forward(input_ids (B, T), past_key_0, past_value_0, ...) -> (logits (B, T, V), present_key_0, ...)``
where ``past_*`` are ``(B, kv_heads, P, head_dim)`` and ``present_*`` have ``P + T`` positions. The
graph is captured from the Hugging Face model rebuilt from the artifact's ``model_config/`` with the
artifact's float tensors, then rewritten by the same passes as the compile pipeline using the
artifact's packed formats (so the decoder holds exactly the same packed weights as ``program.pt2``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from lowbit.compiler.engine.rebuild import rebuild_model
from lowbit.errors import LowbitError

DECODER_FILE = "decoder.onnx"


class DecoderWithCache(nn.Module):
    def __init__(self, model: nn.Module, num_layers: int):
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(self, input_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        p = past[0].shape[2]
        pos = torch.arange(p, p + input_ids.shape[1]).unsqueeze(0)
        out = self.model(input_ids=input_ids, past_key_values=cache, position_ids=pos, use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def _cache_shape(model) -> tuple[int, int, int]:
    c = model.config
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return c.num_hidden_layers, kv, head_dim


def capture_decoder(art):
    """Rewritten decoder graph module (lowbit ops in place of the compressed linears)."""
    from lowbit.passes.base import PassContext, PassManager
    from lowbit.passes.cleanup import CleanUp
    from lowbit.passes.rewrite import ReplaceLinears
    from lowbit.passes.sites import FindLinearSites

    model = rebuild_model(art)
    layers, kv, hd = _cache_shape(model)
    wrapper = DecoderWithCache(model, layers).eval()
    past = tuple(torch.zeros(1, kv, 5, hd) for _ in range(2 * layers))
    ids = torch.randint(0, 100, (1, 3))
    p, t = Dim("past", min=0, max=32768), Dim("seq", min=1, max=32768)
    dyn = ({1: t},) + tuple({2: p} for _ in range(2 * layers))
    try:
        with torch.no_grad():
            ep = torch.export.export(wrapper, (ids, *past), dynamic_shapes=(dyn[0], dyn[1:]))
    except Exception as e:
        raise LowbitError(f"torch.export could not capture the decoder with cache: {type(e).__name__}: {e}") from e
    gm = ep.module()
    ctx = PassContext(results=dict(art.formats))
    PassManager([FindLinearSites(), ReplaceLinears(), CleanUp()]).run(gm, ctx)
    return gm, wrapper, (ids, *past), dyn, layers


def export_decoder(art, out_dir: Path, accuracy_level: int, matmulnbits: bool, float16_storage: bool = True,
                   outliers: dict | None = None, max_block: int | None = None) -> dict:
    from lowbit.compiler.lowering.onnx import _onnx_program, save_model
    from lowbit.passes.base import PassContext
    from lowbit.passes.ort_layout import ToMatMulNBits

    gm, _, args, dyn, layers = capture_decoder(art)
    if matmulnbits:
        ToMatMulNBits(outlier_channels=outliers, max_block=max_block).run(gm, PassContext())
    with torch.no_grad():  # the rewritten module takes the inputs flat
        ep = torch.export.export(gm, args, dynamic_shapes=dyn)
    names_in = ["input_ids"] + [f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    names_out = ["logits"] + [f"present_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    try:
        prog = _onnx_program(ep, args, accuracy_level, names_in, names_out)
    except Exception as e:
        raise LowbitError(f"ONNX export of the decoder failed: {type(e).__name__}: {e}") from e
    save_model(prog, Path(out_dir) / DECODER_FILE, float16_storage)
    _, kv, hd = _cache_shape(gm) if hasattr(gm, "config") else (None, args[1].shape[1], args[1].shape[3])
    return {"file": DECODER_FILE, "cache": {"layers": layers, "kv_heads": int(kv), "head_dim": int(hd)}}


def export_float_decoder(model_spec: str, out_dir, dtype: torch.dtype = torch.float32) -> Path:
    """The uncompressed model's decoder with KV cache (the baseline the benchmarks compare against).

    Writes ``out_dir/decoder.onnx`` (+ ``.data``) and an ``export.json`` like :func:`export_artifact`."""
    import json

    from lowbit.compiler.engine import models
    from lowbit.compiler.lowering.onnx import _onnx_program, save_model

    model, _, _ = models.load(model_spec)
    model = model.to(dtype).eval()
    layers, kv, hd = _cache_shape(model)
    wrapper = DecoderWithCache(model, layers).eval()
    past = tuple(torch.zeros(1, kv, 5, hd, dtype=dtype) for _ in range(2 * layers))
    ids = torch.randint(0, 100, (1, 3))
    p, t = Dim("past", min=0, max=32768), Dim("seq", min=1, max=32768)
    dyn = ({1: t},) + tuple({2: p} for _ in range(2 * layers))
    with torch.no_grad():
        ep = torch.export.export(wrapper, (ids, *past), dynamic_shapes=(dyn[0], dyn[1:]))
    names_in = ["input_ids"] + [f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    names_out = ["logits"] + [f"present_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    prog = _onnx_program(ep, (ids, *past), 0, names_in, names_out)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(prog, out_dir / DECODER_FILE, float16_storage=dtype == torch.float16)
    meta = {"graphs": {"decoder": DECODER_FILE}, "cache": {"layers": layers, "kv_heads": kv, "head_dim": hd},
            "float": True}
    (out_dir / "export.json").write_text(json.dumps(meta, indent=1))
    return out_dir
