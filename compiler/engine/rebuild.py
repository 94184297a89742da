"""The float model of an artifact, and a float model rewritten into given formats.

* :func:`rebuild_model`: the architecture from the artifact's ``model_config/`` with its float tensors
  (embeddings, norms, uncompressed layers); compressed linears get zero float weights (their op replaces them);
* :func:`rewrite_program`: a float model captured with ``torch.export`` and its linears rewritten into packed
  formats by compile's own passes (what fine-tuning and GPTQ-checkpoint import write).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError


def rebuild_model(art) -> nn.Module:
    """The float model (architecture from ``model_config/``, float tensors from the artifact)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dir = Path(art.path) / "model_config"
    if not (cfg_dir / "config.json").is_file():
        raise LowbitError(f"{art.path}: no model_config/config.json (artifact written by an older lowbit; "
                          "compile it again to export a decoder with a key/value cache)")
    config = AutoConfig.from_pretrained(str(cfg_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    sd = art.program.state_dict
    own = dict(model.named_parameters(remove_duplicate=False))
    own.update(dict(model.named_buffers()))
    fill = {}
    for k, v in list(sd.items()) + list(art.program.constants.items()):
        if isinstance(v, torch.Tensor) and k.startswith("model.") and k[len("model."):] in own:
            fill[k[len("model."):]] = v.float()
    quantized = {f"{m}.weight" for m in art.formats}
    for name, t in own.items():
        if name not in fill:
            # compressed linears have no float weight (their op replaces them); tied/non-persistent tensors
            # are re-created by the model below
            fill[name] = torch.zeros(t.shape, dtype=torch.float32) if name in quantized else None
    for name, t in fill.items():
        if t is None:
            continue
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        if isinstance(getattr(mod, attr), nn.Parameter):
            setattr(mod, attr, nn.Parameter(t, requires_grad=False))
        else:
            mod._buffers[attr] = t
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        # tied embeddings: the program keeps one copy (under lm_head)
        inp, outp = model.get_input_embeddings(), model.get_output_embeddings()
        if inp is not None and outp is not None and inp.weight.is_meta and not outp.weight.is_meta:
            inp.weight = outp.weight
        missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise LowbitError(f"{art.path}: no tensor for parameter(s) {missing[:3]} of the decoder")
    for name, b in list(model.named_buffers()):
        if b.is_meta:  # non-persistent buffers (rotary inv_freq): recompute on CPU
            raise LowbitError(f"{art.path}: buffer {name} not in the artifact")
    return model.eval()


def rewrite_program(float_model: nn.Module, formats: dict):
    """``(program, attrs)``: ``float_model`` captured and its linears rewritten into ``formats`` (compile's passes)."""
    from lowbit.compiler.engine import capture
    from lowbit.passes.base import PassContext, PassManager
    from lowbit.passes.cleanup import CleanUp
    from lowbit.passes.rewrite import ReplaceLinears
    from lowbit.passes.sites import FindLinearSites

    gm = capture.capture(float_model).module()
    ctx = PassContext(results=formats)
    PassManager([FindLinearSites(), ReplaceLinears(), CleanUp()]).run(gm, ctx)
    return capture.recapture(gm), {m: v["attrs"] for m, v in ctx.replaced.items()}
