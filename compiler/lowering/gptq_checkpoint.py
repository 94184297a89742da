"""Export a lowbit artifact as a GPTQ checkpoint, and import GPTQ checkpoints as lowbit artifacts.

The checkpoint is a Hugging Face model directory that GPTQModel, transformers (with a GPTQ backend) and
vLLM load: ``config.json`` with a ``quantization_config`` (``quant_method: gptq``, ``bits``,
``group_size``, ``sym: false``, ``desc_act: false``, ``checkpoint_format``), the same block in
``quantize_config.json`` (AutoGPTQ / GPTQModel), ``model.safetensors`` with every float tensor in fp16 and
per quantized linear ``qweight``/``qzeros``/``scales``/``g_idx`` (:mod:`lowbit.runtime.gptq_layout`), and
the tokenizer files. Writing is staged and renamed, like artifacts.

Import reads such a directory (lowbit's own exports, or GPTQ / EfficientQAT checkpoints without act-order
and with one bit width), rebuilds the float architecture from ``config.json``, and writes a lowbit artifact
whose packed layers hold exactly the checkpoint's codes, zero points and scales.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.runtime.output_dir import check_output

WEIGHTS_FILE = "model.safetensors"


def _quant_config(bits: int, group_size: int, version: int) -> dict:
    from lowbit.version import __version__

    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": False, "sym": False,
            "static_groups": False, "true_sequential": True, "lm_head": False,
            "checkpoint_format": "gptq" if version == 1 else "gptq_v2",
            "meta": {"quantizer": [f"lowbit:{__version__}"]}}


def export_gptq(artifact_dir, out_dir, version: int = 1, overwrite: bool = False, progress=None) -> dict:
    """Write the GPTQ checkpoint of an artifact; returns a summary (layers, bytes, zero points at 0)."""
    from safetensors.torch import save_file

    from lowbit.compiler.engine.rebuild import rebuild_model
    from lowbit.runtime import artifact as art
    from lowbit.runtime.artifact import ArtifactError
    from lowbit.runtime.gptq_layout import to_gptq, why_not_gptq

    say = progress or (lambda m: None)
    t0 = time.perf_counter()
    try:
        source = art.load(artifact_dir)
    except ArtifactError as e:
        raise LowbitError(str(e)) from e
    out = Path(out_dir)
    check_output(out, overwrite, protect=[artifact_dir])
    kinds = set()
    for name, fmt in source.formats.items():
        why = why_not_gptq(fmt)
        if why:
            raise LowbitError(f"{artifact_dir}: {name} cannot be written in the GPTQ layout: {why}")
        kinds.add((fmt.bits, fmt.group_size))
    if len(kinds) != 1:
        raise LowbitError(f"{artifact_dir}: layers use several bit widths / group sizes {sorted(kinds)}; a GPTQ "
                          "checkpoint has one")
    bits, group_size = kinds.pop()
    model = rebuild_model(source)
    config = json.loads((Path(source.path) / "model_config" / "config.json").read_text())
    state = {}
    quantized = {f"{m}.weight" for m in source.formats}
    for k, v in model.state_dict().items():
        if k in quantized or (k == "lm_head.weight" and config.get("tie_word_embeddings")):
            continue
        state[k] = v.detach().to(torch.float16).contiguous()
    zero_points_at_0 = 0
    for name, fmt in source.formats.items():
        t, z0 = to_gptq(fmt, version)
        zero_points_at_0 += z0
        state.update({f"{name}.{k}": v for k, v in t.items()})
    qc = _quant_config(bits, group_size, version)
    config["quantization_config"] = qc
    config["torch_dtype"] = "float16"
    with art.staging_dir(out, overwrite=overwrite, protect=[artifact_dir]) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "quantize_config.json").write_text(json.dumps(qc, indent=2))
        tok = Path(source.path) / "tokenizer"
        if tok.is_dir():
            for f in tok.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
    summary = {"layers": len(source.formats), "bits": bits, "group_size": group_size,
               "checkpoint_format": qc["checkpoint_format"], "zero_points_at_0": zero_points_at_0,
               "bytes": (out / WEIGHTS_FILE).stat().st_size, "seconds": time.perf_counter() - t0}
    if zero_points_at_0 and version == 1:
        say(f"[gptq] {zero_points_at_0} group zero points are 0: stored as {(1 << bits) - 1} in the v1 layout, which "
            "GPTQModel reads back exactly; kernels that add 1 without wrapping (AutoGPTQ's asymmetric overflow) do "
            "not -- use --gptq-format v2 for GPTQModel-only use")
    return summary


def _read_quant_config(src: Path) -> dict:
    cfg = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else {}
    qc = cfg.get("quantization_config")
    if qc is None and (src / "quantize_config.json").is_file():
        qc = json.loads((src / "quantize_config.json").read_text())
    if qc is None:
        raise LowbitError(f"{src}: no quantization_config in config.json and no quantize_config.json")
    if qc.get("quant_method", "gptq") != "gptq":
        raise LowbitError(f"{src}: quant_method {qc.get('quant_method')!r}, expected 'gptq'")
    if qc.get("desc_act"):
        raise LowbitError(f"{src}: desc_act (act-order) checkpoints permute columns; lowbit imports desc_act=false")
    for key in ("bits", "group_size"):
        if not isinstance(qc.get(key), int):
            raise LowbitError(f"{src}: quantization_config.{key} missing or not an integer")
    if qc["group_size"] < 1:
        raise LowbitError(f"{src}: group_size {qc['group_size']} (per-channel, -1) is not supported")
    return qc


def import_gptq(src_dir, out_dir, overwrite: bool = False, float_dtype: str = "float16", progress=None) -> dict:
    """Write a lowbit artifact from a GPTQ checkpoint directory; returns a summary."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lowbit.compiler.engine.models import set_linear_weight
    from lowbit.compiler.engine.rebuild import rewrite_program
    from lowbit.runtime import artifact as art
    from lowbit.runtime.gptq_layout import GPTQLayoutError, from_gptq
    from lowbit.version import __version__

    say = progress or (lambda m: None)
    t0 = time.perf_counter()
    src = Path(src_dir)
    if not src.is_dir():
        raise LowbitError(f"GPTQ checkpoint directory not found: {src}")
    out = Path(out_dir)
    check_output(out, overwrite, protect=[src])
    qc = _read_quant_config(src)
    version = 2 if qc.get("checkpoint_format") == "gptq_v2" else 1
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise LowbitError(f"{src}: no .safetensors weights")
    tensors = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    tensors[k] = h.get_tensor(k)
        except Exception as e:
            raise LowbitError(f"{f}: cannot read safetensors: {type(e).__name__}: {e}") from e
    layers = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    if not layers:
        raise LowbitError(f"{src}: no quantized layer (no *.qweight tensor)")
    formats = {}
    for name in layers:
        parts = {s: tensors.pop(f"{name}.{s}", None) for s in ("qweight", "qzeros", "scales", "g_idx")}
        try:
            formats[name] = from_gptq(parts, qc["bits"], qc["group_size"], version, name=f"{src}: {name}")
        except GPTQLayoutError as e:
            raise LowbitError(str(e)) from e

    config = AutoConfig.from_pretrained(str(src))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the float architecture; lowbit's rewrite supplies the packed layers
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    own = model.state_dict()
    float_state = {k: v.float() for k, v in tensors.items() if k in own}
    unknown = sorted(k for k in tensors if k not in own)
    if unknown:
        raise LowbitError(f"{src}: tensors the architecture does not have: {unknown[:5]}")
    missing = model.load_state_dict(float_state, strict=False).missing_keys
    quantized_weights = {f"{n}.weight" for n in formats}
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in missing if k not in quantized_weights and not (tied and k == "lm_head.weight")]
    if missing:
        raise LowbitError(f"{src}: float tensors missing from the checkpoint: {missing[:5]}")
    mods = dict(model.named_modules())
    for name, fmt in formats.items():
        if name not in mods:
            raise LowbitError(f"{src}: quantized layer {name} is not a module of {type(model).__name__}")
        w = mods[name].weight
        if tuple(w.shape) != (fmt.out_features, fmt.in_features):
            raise LowbitError(f"{src}: {name} is ({fmt.out_features}, {fmt.in_features}) in the checkpoint, "
                              f"{tuple(w.shape)} in the architecture")
        set_linear_weight(mods[name], fmt.dequantize())
    model.eval()
    program, attrs = rewrite_program(model, formats)
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": None}[float_dtype]
    extra = {"model": {"id": src.name, "source": str(src), "kind": "gptq-checkpoint", "class": type(model).__name__},
             "method": {"method": "import-gptq", "bits": qc["bits"], "group_size": qc["group_size"],
                        "checkpoint_format": qc.get("checkpoint_format", "gptq"), "tag": f"w{qc['bits']}g{qc['group_size']}"},
             "versions": {"lowbit": __version__, "torch": torch.__version__},
             "float_storage_dtype": float_dtype, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with art.staging_dir(out, overwrite=overwrite, protect=[src]) as tmp:
        art.write(tmp, program, formats, attrs, extra, float_dtype=dtype)
        try:
            AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(tmp / "tokenizer"))
        except Exception as e:  # a checkpoint without tokenizer files still imports
            say(f"[gptq] no tokenizer in {src} ({type(e).__name__}); the artifact has none")
        config.save_pretrained(str(tmp / "model_config"))
        art.load(tmp)  # validate what will ship
    return {"layers": len(formats), "bits": qc["bits"], "group_size": qc["group_size"],
            "checkpoint_format": qc.get("checkpoint_format", "gptq"), "seconds": time.perf_counter() - t0}
