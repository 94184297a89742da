"""Decoder graph of a Llama-family artifact, built directly from its packed formats with ONNX Runtime's fused ops.

The traced decoder (:mod:`lowbit.compiler.lowering.onnx_decoder`) runs ~2,300 small nodes per token for
SmolLM2-135M: at 4 bits the per-node overhead costs more than reading the weights. This builder writes the
graph the way ONNX Runtime's own model builder (onnxruntime-genai) does, about 15 nodes per layer:

* ``SimplifiedLayerNormalization`` / ``com.microsoft::SkipSimplifiedLayerNormalization`` (RMSNorm with the
  residual add fused);
* ``com.microsoft::GroupQueryAttention`` with rotary embedding (``do_rotary``, cos/sin caches from
  ``rope_theta``) and the key/value cache in ``(batch, kv_heads, past, head_dim)``;
* every linear as the lowering of its packed format (:mod:`lowbit.compiler.lowering.ort_linears`);
* with ``kernels="lowbit"``, VQ (ReALLM) and BiLLM linears as ``lowbit.ort::VQMatMul`` / ``BinaryMatMul``
  (lowbit's ONNX Runtime library, :mod:`lowbit.runtime.ort_ops`; the model then imports the ``lowbit.ort`` domain),
  and q/k/v and gate/up (with the SiLU gate) as one ``lowbit.ort::VQLinears`` / ``BinaryLinears`` node each;
* the MLP's SiLU as ``com.microsoft::QuickGelu`` with ``alpha`` 1 (one node instead of ``Sigmoid`` and ``Mul``);
* the head as ``MatMulNBits`` when the artifact's ``lm_head`` is compressed, and then (tied embeddings) the
  embedding as ``com.microsoft::GatherBlockQuantized`` over the same codes; a float tied head is stored
  once, transposed, and the embedding gathers its columns.

Inputs and outputs follow onnxruntime-genai's names: ``input_ids (B, T)``, ``attention_mask (B, P+T)``,
``past_key_values.{i}.key/value`` -> ``logits (B, T, V)``, ``present.{i}.key/value``. Supported: Llama-type
configs (``llama``, ``mistral`` without sliding window, ``qwen2``) with default rotary embedding; anything else
keeps the traced decoder (:func:`unsupported_reason` says why).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lowbit.runtime.ort_ops import DOMAIN as ORT_OPS_DOMAIN

from .onnx_fuse import drop_split, fuse_lowbit_linears, fuse_matmulnbits, merge_side_terms
from .onnx_graph import MSFT, GraphBuilder, save_deduplicated
from .ort_linears import GRID_BITS, _np, lower_linear

DECODER_FILE = "decoder.onnx"
SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


def _config(art) -> dict:
    p = Path(art.path) / "model_config" / "config.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def _rope(cfg: dict) -> dict:
    return cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}


def unsupported_reason(art) -> str | None:
    """Why this artifact's decoder cannot be built directly (``None`` if it can)."""
    cfg = _config(art)
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_TYPES:
        return f"model_type {mt!r} (direct build supports {', '.join(SUPPORTED_TYPES)})"
    if _rope(cfg).get("rope_type", "default") != "default":
        return f"rope_type {_rope(cfg).get('rope_type')!r} (only the default rotary embedding)"
    if cfg.get("sliding_window") and cfg.get("use_sliding_window", mt == "mistral"):
        return "sliding-window attention"
    if cfg.get("hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.get('hidden_act')!r}"
    return None


def names(layers: int) -> tuple[list[str], list[str]]:
    ins = ["input_ids", "attention_mask"]
    outs = ["logits"]
    for i in range(layers):
        ins += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outs += [f"present.{i}.key", f"present.{i}.value"]
    return ins, outs


class _Tensors:
    """The artifact's float tensors by Hugging Face name (``model.layers.0.input_layernorm.weight``)."""

    def __init__(self, art):
        self.t = {}
        for k, v in [] if art is None else list(art.program.state_dict.items()) + list(art.program.constants.items()):
            if isinstance(v, torch.Tensor) and k.startswith("model."):
                self.t[k[len("model."):]] = v

    def get(self, name: str):
        return self.t.get(name)

    def need(self, name: str) -> torch.Tensor:
        if name not in self.t:
            raise KeyError(f"the artifact has no float tensor {name!r}")
        return self.t[name]


def build_decoder(art, path: Path, accuracy_level: int = 4, max_block: int | None = 32, vq_block: int = 32,
                  max_positions: int | None = None, outliers: dict | None = None, binary: str = "grid",
                  fuse: bool = True, vq_lowrank: str = "fold", grid_bits: int = GRID_BITS,
                  kernels: str = "stock") -> dict:
    """Write ``path`` (+ ``.data``) for an artifact and return ``{"cache", "layers": {name: record}, "head", ...}``.

    ``outliers``: ``{module name: LongTensor of input channels}`` taken out of ``MatMulNBits``' int8 activation
    path at ``accuracy_level`` 4 (measured on SmolLM2 with 32-column blocks: not needed, so off by default).
    ``fuse``: q/k/v and gate/up, where their lowerings are sibling ``MatMulNBits`` nodes (or, with lowbit's
    kernels, ``VQMatMul`` or ``BinaryMatMul`` nodes), run as one node each (:mod:`~lowbit.compiler.lowering.onnx_fuse`; exact, fewer
    kernel calls per token). ``vq_lowrank``,
    ``grid_bits``, ``kernels``: see :func:`~lowbit.compiler.lowering.ort_linears.lower_linear`."""
    why = unsupported_reason(art)
    if why:
        raise ValueError(why)
    return _build(_config(art), _Tensors(art), art.formats, path, accuracy_level, max_block, vq_block,
                  max_positions, outliers, binary, fuse, vq_lowrank, grid_bits, kernels)


def build_float_decoder(model, path: Path, max_positions: int | None = None, fuse: bool = True) -> dict:
    """The same graph for an uncompressed Hugging Face model (the float32 baseline of the benchmarks)."""
    tens = _Tensors(None)
    tens.t = {k: v for k, v in model.state_dict().items()}
    if "lm_head.weight" not in tens.t and model.get_output_embeddings() is not None:
        tens.t["lm_head.weight"] = model.get_output_embeddings().weight
    return _build(model.config.to_dict(), tens, {}, path, 0, None, 32, max_positions, None, "grid", fuse)


def _build(cfg, tens, formats, path, accuracy_level, max_block, vq_block, max_positions, outliers, binary,
           fuse, vq_lowrank: str = "fold", grid_bits: int = GRID_BITS, kernels: str = "stock") -> dict:
    from onnx import TensorProto, helper

    L = int(cfg["num_hidden_layers"])
    H = int(cfg["hidden_size"])
    nh = int(cfg["num_attention_heads"])
    kvh = int(cfg.get("num_key_value_heads") or nh)
    hd = int(cfg.get("head_dim") or H // nh)
    eps = float(cfg.get("rms_norm_eps", 1e-6))
    theta = float(_rope(cfg).get("rope_theta", cfg.get("rope_theta", 10000.0)))
    max_pos = int(max_positions or cfg.get("max_position_embeddings", 4096))
    vocab = int(cfg["vocab_size"])
    tied = bool(cfg.get("tie_word_embeddings", False))

    g = GraphBuilder()
    records = {}
    fusions = 0  # q/k/v and gate/up merged into one MatMulNBits each (onnx_fuse)

    def merged(mods, name):
        """``mods`` (one input) as one MatMulNBits and one side term, or None where they do not merge."""
        nonlocal fusions
        fused = fuse_matmulnbits(g, mods, name) if fuse else None
        if fused:
            fusions += 1
            records[mods[0]]["ort_bytes"] += merge_side_terms(g, fused, name)  # the merged side's zeros
        return fused

    def merged_lowbit(mods, name, gated=False):
        """``mods`` as one lowbit.ort::VQLinears / BinaryLinears node (lowbit's kernels), or None where they do
        not merge."""
        out = fuse_lowbit_linears(g, mods, name, gated=gated) if fuse and kernels == "lowbit" else None
        if out is not None:
            fusions_lowbit.append(name)
            op = g.nodes[[n.output[0] for n in g.nodes].index(out)].op_type
            for m in mods:
                records[m]["lowering"] += f"; one lowbit.ort::{op} node with " + \
                    ", ".join(x.rsplit(".", 1)[-1] for x in mods) + (" and the SiLU gate" if gated else "")
        return out

    fusions_lowbit = []  # q/k/v and gate/up merged into one VQLinears / BinaryLinears node each
    splits = {}  # (input, channels) -> (input with them zeroed, their columns): shared by q/k/v and gate/up

    def linear(x, mod):
        fmt = formats.get(mod)
        w = None if fmt is not None else tens.need(f"{mod}.weight")
        idx = (outliers or {}).get(mod) if fmt is not None and accuracy_level == 4 else None
        xin = x
        if idx is not None and len(idx):  # see ort_layout: massive channels kept out of the int8 activation path
            key = (x, tuple(idx.tolist()))
            if key not in splits:
                keep = np.ones(fmt.in_features, np.float32)
                keep[idx.numpy()] = 0.0
                splits[key] = (g.op("Mul", [x, g.init(f"{mod}.act_keep", keep)], name=f"{mod}.act_keep"),
                               g.op("Gather", [x, g.const_i64(f"{mod}.act_idx", idx.tolist())],
                                    name=f"{mod}.act_gather", axis=-1))
            xin, xo = splits[key]
        y, rec = lower_linear(g, xin, fmt, mod, weight=w, bias=tens.get(f"{mod}.bias"),
                              accuracy_level=accuracy_level, max_block=max_block, vq_block=vq_block, binary=binary,
                              vq_lowrank=vq_lowrank, grid_bits=grid_bits, kernels=kernels)
        if xin is not x:  # the dequantized columns (low-rank part included) in float: x[..., idx] @ W[:, idx].T
            cols = _np(fmt.dequantize()[:, idx].t().contiguous())
            t = g.op("MatMul", [xo, g.init(f"{mod}.act_cols_t", cols)], name=f"{mod}.act_cols")
            y = g.op("Add", [y, t], name=f"{mod}.act_add")
            rec["activation_outliers"] = idx.tolist()
            rec["ort_bytes"] += cols.nbytes
        records[mod] = rec
        return y

    # -- embedding and head tables ---------------------------------------------------------------------------
    head_fmt = formats.get("lm_head")
    emb_w = tens.get("model.embed_tokens.weight")
    head_w = tens.get("lm_head.weight")
    if emb_w is None and tied:
        emb_w = head_w
    head = {"kind": None}
    hidden = None
    gbq = _gbq_inputs(head_fmt, max_block) if head_fmt is not None and tied else None
    if gbq is not None:  # the tied table's own codes, gathered and dequantized per row
        data, scales, zp, bits, blk = gbq
        ins = [g.init("embed.codes", data), g.init("embed.scales", scales), g.init("embed.zp", zp)]
        hidden = g.op("GatherBlockQuantized", [ins[0], "input_ids", ins[1], ins[2]], domain=MSFT, name="embed",
                      gather_axis=0, quantize_axis=1, block_size=blk, bits=bits)
        head["embedding"] = f"GatherBlockQuantized {bits}-bit block {blk} (the head's codes)"
        head["embedding_bytes"] = int(data.nbytes + scales.nbytes + zp.nbytes)
    float_head_t = None
    if hidden is None:
        if emb_w is None:
            raise KeyError("the artifact has no embedding table")
        if head_fmt is None and tied:  # one float copy: the head's (K, V) matrix; the embedding gathers columns
            float_head_t = g.init("lm_head.weight_t", _np(emb_w.float().t().contiguous()))
            cols = g.op("Gather", [float_head_t, "input_ids"], name="embed", axis=1)  # (K, B, T)
            hidden = g.op("Transpose", [cols], name="embed_t", perm=[1, 2, 0])
            head["embedding"] = "float Gather of the tied head's columns"
        else:
            hidden = g.op("Gather", [g.init("embed.weight", _np(emb_w.float())), "input_ids"], name="embed", axis=0)
            head["embedding"] = "float Gather"
            head["embedding_bytes"] = int(emb_w.numel() * 4)

    # -- attention bookkeeping (as onnxruntime-genai feeds it) ---------------------------------------------
    mask_sum = g.op("ReduceSum", ["attention_mask", g.const_i64("axes1", [1])], name="mask_sum", keepdims=0)
    seqlens = g.op("Cast", [g.op("Sub", [mask_sum, g.const_i64("one", 1)], name="mask_sub")], name="seqlens_k",
                   to=TensorProto.INT32)
    total = g.op("Cast", [g.op("Gather", [g.op("Shape", ["attention_mask"], name="mask_shape"),
                                          g.const_i64("idx1", 1)], name="total_len", axis=0)],
                 name="total_len_i32", to=TensorProto.INT32)
    inv = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    ang = np.arange(max_pos, dtype=np.float64)[:, None] * inv[None, :]
    cos = g.init("rope.cos", np.cos(ang).astype(np.float32))
    sin = g.init("rope.sin", np.sin(ang).astype(np.float32))

    residual = hidden
    x = g.op("SimplifiedLayerNormalization",
             [residual, g.init("model.layers.0.input_layernorm.weight",
                               _np(tens.need("model.layers.0.input_layernorm.weight").float()))],
             name="layers.0.input_norm", axis=-1, epsilon=eps, stash_type=1)
    in_names, out_names = names(L)
    for i in range(L):
        p = f"model.layers.{i}"
        qkv_mods = [f"{p}.self_attn.{m}_proj" for m in "qkv"]
        q, k, v = (linear(x, m) for m in qkv_mods)
        fused = merged(qkv_mods, f"{p}.self_attn.qkv_proj") or merged_lowbit(qkv_mods, f"{p}.self_attn.qkv_proj")
        if isinstance(fused, dict) and [q, k, v] == list(fused["split"].output):  # nothing else after it: GQA's packed QKV input
            q, k, v = drop_split(g, fused), None, None
        att, pk, pv = g.op("GroupQueryAttention", [q, k, v, in_names[2 + 2 * i], in_names[3 + 2 * i], seqlens, total,
                                                   cos, sin], n_out=3, domain=MSFT, name=f"layers.{i}.attn",
                           num_heads=nh, kv_num_heads=kvh, do_rotary=1, rotary_interleaved=0,
                           scale=float(hd ** -0.5))
        g.nodes[-1].output[1] = out_names[1 + 2 * i]
        g.nodes[-1].output[2] = out_names[2 + 2 * i]
        o = linear(att, f"{p}.self_attn.o_proj")
        nw = g.init(f"{p}.post_attention_layernorm.weight", _np(tens.need(f"{p}.post_attention_layernorm.weight").float()))
        x, residual = _skip_norm(g, o, residual, nw, f"layers.{i}.post_attn_norm", eps)
        gate = linear(x, f"{p}.mlp.gate_proj")
        up = linear(x, f"{p}.mlp.up_proj")
        mlp_mods = [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"]
        gated = None
        if not merged(mlp_mods, f"{p}.mlp.gate_up_proj"):
            gated = merged_lowbit(mlp_mods, f"{p}.mlp.gate_up_proj", gated=True)  # silu(gate) * up inside the node
        if gated is None:
            # SiLU as one node: com.microsoft::QuickGelu computes x * sigmoid(alpha * x), with alpha 1 exactly SiLU
            act = g.op("QuickGelu", [gate], domain=MSFT, name=f"layers.{i}.mlp.silu", alpha=1.0)
            gated = g.op("Mul", [act, up], name=f"layers.{i}.mlp.gated")
        down = linear(gated, f"{p}.mlp.down_proj")
        last = i == L - 1
        nname = "model.norm.weight" if last else f"model.layers.{i + 1}.input_layernorm.weight"
        x, residual = _skip_norm(g, down, residual, g.init(nname, _np(tens.need(nname).float())),
                                 "final_norm" if last else f"layers.{i + 1}.input_norm", eps)
    if head_fmt is not None:
        linear(x, "lm_head")
        head.update(kind="packed", **records["lm_head"])
    elif float_head_t is not None:
        g.op("MatMul", [x, float_head_t], name="lm_head")
        head.update(kind="float (tied, one copy)", ort_bytes=int(emb_w.numel() * 4))
    else:
        linear(x, "lm_head")
        head.update(kind="float", **records["lm_head"])
    g.nodes[-1].output[0] = "logits"  # the head's last node (MatMulNBits, MatMul or a bias Add) is the output

    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "seq", vocab])]
    for i in range(L):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f32,
                                                        ["batch", kvh, "past", hd]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", f32, ["batch", kvh, "total", hd]))
    graph = helper.make_graph(g.nodes, "lowbit_decoder", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(MSFT, 1)]
    if any(n.domain == ORT_OPS_DOMAIN for n in g.nodes):  # lowbit's ONNX Runtime library must be registered
        opsets.append(helper.make_opsetid(ORT_OPS_DOMAIN, 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="lowbit")
    model.ir_version = 10
    saved = save_deduplicated(model, path)
    return {"file": Path(path).name, "builder": "direct (fused ORT ops)", "nodes": len(g.nodes),
            "merged_matmulnbits": fusions, "merged_lowbit_linears": len(fusions_lowbit),
            "cache": {"layers": L, "kv_heads": kvh, "head_dim": hd, "max_positions": max_pos},
            "io": "genai", "head": head, "layers": records, "shared_bytes": saved["shared"],
            # every weight ONNX Runtime holds: the linears (head included) and the embedding table
            "ort_weight_bytes": int(sum(r["ort_bytes"] for r in records.values()) + head.get("embedding_bytes", 0)
                                    + head.get("ort_bytes", 0) * (head["kind"] == "float (tied, one copy)")
                                    - saved["shared"]),
            "packed_bytes": int(sum(r["packed_bytes"] for r in records.values()))}


def _skip_norm(g: GraphBuilder, x: str, residual: str, weight: str, name: str, eps: float) -> tuple[str, str]:
    """RMSNorm of ``x + residual`` and the new residual, one fused node (its mean/inv-std outputs unused)."""
    out, _, _, res = g.op("SkipSimplifiedLayerNormalization", [x, residual, weight], n_out=4, domain=MSFT,
                          name=name, epsilon=eps)
    g.nodes[-1].output[1] = ""
    g.nodes[-1].output[2] = ""
    return out, res


def _gbq_inputs(fmt, max_block):
    """``GatherBlockQuantized`` inputs holding exactly an affine head's weights (4- or 8-bit field), or ``None``."""
    from lowbit.passes.ort_layout import ort_bits, repack_for_matmulnbits
    from lowbit.runtime.formats import AffineIntK

    if not isinstance(fmt, AffineIntK) or fmt.lowrank is not None or fmt.symmetric:
        return None
    ob = ort_bits(fmt.bits)
    gs = fmt.group_size
    blk = min(gs, max_block) if max_block else gs
    if ob not in (4, 8) or blk < 16 or blk & (blk - 1) or fmt.in_features % blk:
        return None
    b, sc, zp = repack_for_matmulnbits(fmt.qweight, fmt.scales, fmt.zeros, fmt.bits, gs, fmt.in_features,
                                       torch.float32, blk)
    return _np(b.reshape(b.shape[0], -1)), _np(sc), _np(zp), ob, blk
