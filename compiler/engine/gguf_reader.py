"""A GGUF file read one tensor at a time, for block streaming (``lowbit-compile MODEL.gguf --stream``).

``GGUFCheckpoint.get(name)`` gives the tensor that transformers' GGUF loader puts under the Hugging Face parameter
``name`` (``from_pretrained(dir, gguf_file=...)``): the file's tensor, dequantized to float32 (``gguf``'s own
dequantization, every GGML type it knows), with llama.cpp's q/k row permutation undone
(llama.cpp interleaves each head's rotary halves; transformers keeps them as two halves). Names are mapped with
transformers' own GGUF-to-HF table built on the meta model. ``tests/test_stream.py`` checks every tensor against
``from_pretrained`` for the bundled SmolLM2 GGUF and a tiny GGUF written in the test.

The file is memory-mapped (``gguf.GGUFReader``); only the tensor asked for is read and dequantized, so the
float model is never resident. Only the ``llama`` GGUF architecture is read (tested); others are refused with a
message rather than loaded wrong.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lowbit.errors import LowbitError

# gguf "general.architecture" values this reader is tested on (llama.cpp permutes their q/k rows). Others have
# their own conventions (Gemma stores norms as w + 1, Phi-3 fuses q/k/v) and are refused rather than loaded wrong.
_SUPPORTED = {"llama"}


class GGUFCheckpoint:
    """The tensors of one GGUF file under their Hugging Face names, read one at a time (``get``)."""

    def __init__(self, path: Path, config, meta_model):
        from lowbit.compiler.engine.models import gguf_reader

        self.path = Path(path)
        self.directory = self.path  # for messages shared with the safetensors Checkpoint
        try:
            self.reader = gguf_reader(self.path)  # the parse the model check made (models.gguf_reader)
        except Exception as e:
            raise LowbitError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        arch = _field(self.reader, "general.architecture")
        if arch not in _SUPPORTED:
            raise LowbitError(f"{self.path}: --stream reads GGUF files of the Llama architecture (Llama, SmolLM2, "
                              f"Mistral as llama.cpp writes it); this one is {arch!r}: compile it without --stream")
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

        processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
        gguf_to_hf = get_gguf_hf_weights_map(meta_model, processor)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.hf_to_gguf = {hf: g for g, hf in gguf_to_hf.items() if g in self.tensors}

    def __contains__(self, name: str) -> bool:
        return name in self.hf_to_gguf

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from gguf.quants import dequantize

        if name not in self.hf_to_gguf:
            raise LowbitError(f"{self.path}: no tensor for {name!r} in the GGUF file")
        g = self.hf_to_gguf[name]
        t = self.tensors[g]
        try:
            w = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise LowbitError(f"{self.path}: cannot read {g} ({t.tensor_type.name}): {type(e).__name__}: {e}") from e
        if ".attn_q." in g or ".attn_k." in g:  # llama.cpp's rotary row order back to transformers'
            w = _unpermute(w, self.heads if ".attn_q." in g else self.kv_heads)
        return torch.from_numpy(np.array(w, dtype=np.float32)).to(dtype)  # a copy: F32 tensors are the mapped file


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute``: each head's rows go from interleaved rotary pairs back to two halves."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _field(reader, key: str):
    f = reader.fields.get(key)
    if f is None:
        raise LowbitError(f"GGUF file has no {key!r} field")
    return bytes(f.parts[f.data[0]]).decode()
