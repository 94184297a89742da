"""Tiny random-weight models for tests and examples (no downloads).

``make_tiny(arch, directory)`` writes a Hugging Face model directory (safetensors + config + a byte-level
tokenizer) for one of :data:`ARCHS`. The tokenizer maps each UTF-8 byte to one token, so any text works.
"""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("llama", "qwen2", "mistral", "phi3", "opt", "gpt2")
VOCAB = 260  # 256 bytes + 4 specials


def _config(arch: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, max_position_embeddings=512)
    if arch == "llama":
        return tf.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, tie_word_embeddings=True, **common)
    if arch == "qwen2":  # q/k/v carry biases
        return tf.Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, **common)
    if arch == "mistral":
        return tf.MistralConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, sliding_window=None, **common)
    if arch == "phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=4, pad_token_id=0, **common)
    if arch == "opt":
        return tf.OPTConfig(hidden_size=64, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4,
                            word_embed_proj_dim=64, pad_token_id=1, vocab_size=VOCAB, max_position_embeddings=512)
    if arch == "gpt2":  # Conv1D -> addmm
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, vocab_size=VOCAB)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose from {ARCHS}")


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # ByteLevel maps bytes to printable unicode; a vocabulary of those 256 symbols and no merges
    # makes one token per byte.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for s in ("<pad>", "<s>", "</s>", "<unk>"):
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def make_tiny(arch: str, directory, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = _config(arch)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    # Non-trivial weights so quantization error is measurable: random init (std 0.02) scaled up.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    d = Path(directory)
    model.save_pretrained(d, safe_serialization=True)
    byte_tokenizer().save_pretrained(d)
    return d


def make_tiny_gguf(path, seed=0, vocab_size=1024):
    """A tiny Llama GGUF (2 blocks, hidden 64, 4 heads / 2 kv heads, tied head) with SmolLM2's tokenizer cut to its
    first ``vocab_size`` tokens (special tokens, bytes and the merges that make the kept tokens: a valid byte-level
    BPE; the whole 49,152-token vocabulary made each GGUF header parse take ~8 s), its linears in Q4_1, the
    embedding in Q8_0, norms in F32 (as llama.cpp writes the bundled SmolLM2)."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q, GGUFReader, GGUFWriter
    from gguf.quants import quantize

    from lowbit.compiler.engine import models

    tok = GGUFReader(str(models.resolve("smollm2-135m").path)).fields
    rng = np.random.default_rng(seed)
    tokens = tok["tokenizer.ggml.tokens"].contents()[:vocab_size]
    kept = set(tokens)
    merges = [m for m in tok["tokenizer.ggml.merges"].contents()
              if m.replace(" ", "", 1) in kept and all(part in kept for part in m.split(" ", 1))]
    h, inter, vocab, blocks = 64, 128, len(tokens), 2
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(blocks)
    w.add_context_length(2048)
    w.add_embedding_length(h)
    w.add_feed_forward_length(inter)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(h // 4)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(tok["tokenizer.ggml.token_type"].contents()[:vocab])
    w.add_token_merges(merges)
    for key, fn in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unknown", w.add_unk_token_id),
                    ("padding", w.add_pad_token_id)):
        fn(tok[f"tokenizer.ggml.{key}_token_id"].contents())
    w.add_add_bos_token(False)

    def tensor(name, shape, qtype):
        a = (rng.standard_normal(shape) * 0.05).astype(np.float32) if qtype != Q.F32 else \
            (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        w.add_tensor(name, quantize(a, qtype) if qtype != Q.F32 else a, raw_dtype=qtype)

    tensor("token_embd.weight", (vocab, h), Q.Q8_0)
    kv = h // 4 * 2
    for i in range(blocks):
        tensor(f"blk.{i}.attn_norm.weight", (h,), Q.F32)
        for n, shape in (("attn_q", (h, h)), ("attn_k", (kv, h)), ("attn_v", (kv, h)), ("attn_output", (h, h)),
                         ("ffn_gate", (inter, h)), ("ffn_up", (inter, h)), ("ffn_down", (h, inter))):
            tensor(f"blk.{i}.{n}.weight", shape, Q.Q4_1)
        tensor(f"blk.{i}.ffn_norm.weight", (h,), Q.F32)
    tensor("output_norm.weight", (h,), Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
