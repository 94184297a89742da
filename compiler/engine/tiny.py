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
