"""``lowbit-export DIR --onnx --genai``: make ``DIR/onnx/`` a model folder that onnxruntime-genai loads.

onnxruntime-genai (the C/C#/Java/Python generation API ONNX Runtime ships for phones and desktops) reads
``genai_config.json`` (the decoder file, its input/output names, the cache geometry, token ids, search
defaults) and the Hugging Face tokenizer files from the same folder. The directly built decoder
(:mod:`lowbit.compiler.lowering.onnx_llama`) already uses its names and cache layout; this writes the rest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

GENAI_CONFIG = "genai_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _token_id(v):
    return v[0] if isinstance(v, list) else v


def write_genai_config(art, onnx_dir: Path, decoder_file: str, cache: dict) -> list[str]:
    """Write ``genai_config.json`` and copy the tokenizer files into ``onnx_dir``; returns the files written."""
    cfg = json.loads((Path(art.path) / "model_config" / "config.json").read_text())
    ctx = int(cache.get("max_positions") or cfg.get("max_position_embeddings", 4096))
    eos = _token_id(cfg.get("eos_token_id", 2))
    genai = {
        "model": {
            "bos_token_id": _token_id(cfg.get("bos_token_id", 1)),
            "context_length": ctx,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": decoder_file,
                "head_size": cache["head_dim"],
                "hidden_size": cfg["hidden_size"],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": cfg["num_attention_heads"],
                "num_hidden_layers": cache["layers"],
                "num_key_value_heads": cache["kv_heads"],
            },
            "eos_token_id": eos,
            "pad_token_id": _token_id(cfg.get("pad_token_id", eos)) if cfg.get("pad_token_id") is not None else eos,
            "type": cfg.get("model_type", "llama"),
            "vocab_size": cfg["vocab_size"],
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": ctx, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }
    (onnx_dir / GENAI_CONFIG).write_text(json.dumps(genai, indent=1))
    written = [GENAI_CONFIG]
    tok = Path(art.path) / "tokenizer"
    for name in TOKENIZER_FILES:
        if (tok / name).is_file():
            shutil.copyfile(tok / name, onnx_dir / name)
            written.append(name)
    return written


def genai_generate(onnx_dir, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens from onnxruntime-genai (``pip install onnxruntime-genai``) for prompt token ids."""
    import onnxruntime_genai as og

    model = og.Model(str(onnx_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + max_new_tokens)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    out = []
    while not gen.is_done() and len(out) < max_new_tokens:
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out
