"""``lowbit-export --onnx``: an artifact's ``DIR/onnx/`` -- the prefill graph (:mod:`~lowbit.compiler.lowering.onnx`),
the decoder with key/value cache (:mod:`~lowbit.compiler.lowering.onnx_decoder`), ``export.json``, and a check in
ONNX Runtime against the torch program. Written to a hidden staging folder and renamed when complete."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from lowbit.compiler.lowering.onnx import (
    EXPORT_JSON,
    INT8_MAX_BLOCK,
    MODEL_FILE,
    ONNX_DIR,
    OPSET,
    _onnx_program,
    find_activation_outliers,
    lower_program,
    node_counts,
    save_model,
)
from lowbit.errors import LowbitError


def export_artifact(artifact_dir, accuracy_level: int = 4, matmulnbits: bool = True, kv_cache: bool = True,
                    overwrite: bool = False, check: bool = True, outlier_data: str | None = "c4",
                    decoder: str = "auto", genai: bool = False, binary: str = "grid", vq_lowrank: str = "fold",
                    grid_bits: int = 8, kernels: str = "stock", progress=print) -> dict:
    """Export an artifact directory to ONNX under ``DIR/onnx``; returns the export summary.

    ``decoder``: ``direct`` builds the key/value-cache decoder from the packed formats with ONNX Runtime's fused
    ops and onnxruntime-genai's input names (:mod:`~lowbit.compiler.lowering.onnx_llama`; Llama-type models),
    ``traced`` captures it with torch.export (any architecture), ``auto`` the first that applies. ``genai``: also
    write ``genai_config.json`` and the tokenizer so that onnxruntime-genai loads ``DIR/onnx`` (direct decoder).
    ``binary``: BiLLM's lowering in the direct decoder, ``grid`` (the value grid, measured error) or ``exact``.
    ``vq_lowrank``: a VQ format's low-rank term in the direct decoder, ``exact`` (float MatMul pair) or ``fold``
    (added to the weight before its grid: fewer nodes, error recorded). ``grid_bits``: the grid (8 or 4 bits) that
    BiLLM's levels and VQ values x scales are rounded onto in the direct decoder (4: ORT's fastest kernel, ~17x
    the grid error of 8). ``kernels``: ``lowbit`` runs VQ and BiLLM layers of the direct decoder as ``lowbit.ort::VQMatMul`` /
    ``BinaryMatMul`` (exact; needs lowbit's ONNX Runtime library, :mod:`lowbit.runtime.ort_ops`, built), ``stock``
    only ORT's ops."""
    from lowbit.runtime.artifact import load, staging_dir

    if decoder not in ("auto", "direct", "traced"):
        raise LowbitError(f"decoder must be auto, direct or traced, got {decoder!r}")
    if genai and (decoder == "traced" or not kv_cache):
        raise LowbitError("--genai needs the direct decoder with key/value cache (not --decoder traced/--no-kv-cache)")
    if genai:
        decoder = "direct"
    if binary not in ("grid", "exact"):
        raise LowbitError(f"binary lowering must be grid or exact, got {binary!r}")
    if vq_lowrank not in ("exact", "fold"):
        raise LowbitError(f"VQ low-rank lowering must be exact or fold, got {vq_lowrank!r}")
    from lowbit.compiler.lowering.ort_linears import VALUE_GRID_BITS

    if grid_bits not in VALUE_GRID_BITS:
        raise LowbitError(f"--value-grid-bits must be 4 or 8, got {grid_bits}")

    from lowbit.compiler.lowering.ort_linears import ORT_KERNELS

    if kernels not in ORT_KERNELS:
        raise LowbitError(f"--ort-kernels must be one of {', '.join(ORT_KERNELS)}, got {kernels!r}")
    if kernels == "lowbit":
        from lowbit.runtime import ort_ops

        if genai:
            raise LowbitError("--genai with --ort-kernels lowbit is not supported: onnxruntime-genai would have to load "
                              "lowbit's native library named by the folder; export the genai folder with stock kernels")
        if decoder == "traced" or not kv_cache or not matmulnbits:
            raise LowbitError("--ort-kernels lowbit applies to the direct decoder (not with --decoder traced, "
                              "--no-kv-cache or --no-matmulnbits)")
        ort_ops.require()  # built, or an error that says how to build it
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise LowbitError(f"--accuracy-level must be 0-4, got {accuracy_level}")
    artifact_dir = Path(artifact_dir)
    art = load(artifact_dir)
    final = artifact_dir / ONNX_DIR
    t0 = time.perf_counter()
    with staging_dir(final, overwrite=overwrite) as tmp:  # refuses an existing one without overwrite
        progress(f"[onnx] lowering {artifact_dir} (MatMulNBits: {'on' if matmulnbits else 'off'}, "
                 f"accuracy_level {accuracy_level})")
        outliers = find_activation_outliers(art, outlier_data, progress) if matmulnbits and accuracy_level == 4 else {}
        max_block = INT8_MAX_BLOCK if accuracy_level == 4 else None
        ep, rep, gm = lower_program(art.program, matmulnbits, outliers, max_block)
        example = (torch.randint(0, 100, (1, 8)),)
        try:
            prog = _onnx_program(ep, example, accuracy_level, ["input_ids"], ["logits"],
                                 dynamic_shapes=({0: "batch", 1: "sequence"},))
        except Exception as e:
            raise LowbitError(f"ONNX export of {artifact_dir} failed: {type(e).__name__}: {e}") from e
        f16 = art.manifest.get("float_storage_dtype", "float16") != "float32"
        save_model(prog, tmp / MODEL_FILE, float16_storage=f16)
        files = [MODEL_FILE, MODEL_FILE + ".data"]
        summary = {"opset": OPSET, "accuracy_level": accuracy_level, "matmulnbits": matmulnbits,
                   "float_storage": "float16" if f16 else "float32",
                   "activation_outliers": {k: v.tolist() for k, v in outliers.items()},
                   "matmulnbits_max_block": max_block,
                   "pass": None if rep is None else rep.to_json(), "graphs": {"prefill": MODEL_FILE}}
        if kv_cache:
            dec = _export_decoder(art, tmp, decoder, accuracy_level, matmulnbits, f16, outliers, max_block, binary,
                                  vq_lowrank, grid_bits, kernels, progress)
            files += [dec["file"], dec["file"] + ".data"]
            summary["graphs"]["decoder"] = dec["file"]
            summary["cache"] = dec["cache"]
            summary["decoder"] = {k: v for k, v in dec.items() if k not in ("file", "cache")}
            if genai:
                from lowbit.compiler.lowering.onnx_genai import write_genai_config

                files += write_genai_config(art, tmp, dec["file"], dec["cache"])
                summary["genai"] = True
                progress("[onnx] genai_config.json and tokenizer written (onnxruntime-genai model folder)")
        summary["nodes"] = node_counts(tmp / MODEL_FILE)
        if check:
            from lowbit.runtime.onnx_runtime import session

            s = session(tmp, MODEL_FILE)
            ids = torch.randint(0, min(100, art.manifest.get("vocab_size", 100)), (1, 12))
            ref = art(ids).float()
            got = torch.from_numpy(s.run(None, {"input_ids": ids.numpy()})[0])
            err = float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-9))
            summary["check"] = {"max_rel_err_vs_torch": err, "tokens": 12}
            progress(f"[onnx] ONNX Runtime vs torch program: max relative logit error {err:.2e}")
            if kv_cache:
                from lowbit.runtime.onnx_runtime import OrtDecoder

                dec = OrtDecoder(tmp, verify=False, meta=summary)
                got = torch.from_numpy(dec.step(ids.numpy(), dec.empty_cache())[0])
                err = float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-9))
                summary["check"]["decoder_max_rel_err_vs_torch"] = err
                progress(f"[onnx] decoder in ONNX Runtime vs torch program: max relative logit error {err:.2e}")
        from lowbit.runtime.artifact import sha256_file

        summary["files"] = {f: {"bytes": (tmp / f).stat().st_size, "sha256": sha256_file(tmp / f)} for f in files}
        summary["seconds"] = time.perf_counter() - t0
        (tmp / EXPORT_JSON).write_text(json.dumps(summary, indent=1))
    return summary


def _export_decoder(art, out_dir: Path, decoder: str, accuracy_level: int, matmulnbits: bool, f16: bool,
                    outliers: dict, max_block, binary: str, vq_lowrank: str, grid_bits: int, kernels: str,
                    progress) -> dict:
    from lowbit.compiler.lowering.onnx_decoder import export_decoder
    from lowbit.compiler.lowering.onnx_llama import DECODER_FILE, build_decoder, unsupported_reason

    why = unsupported_reason(art) if matmulnbits else "MatMulNBits off"
    if decoder == "direct" and why:
        raise LowbitError(f"{art.path}: no direct decoder build: {why} (use the traced decoder)")
    if decoder == "traced" or why:
        progress("[onnx] exporting the decoder with key/value cache (torch.export trace"
                 + (f"; direct build: {why})" if why and decoder == "auto" else ")"))
        out = export_decoder(art, out_dir, accuracy_level, matmulnbits, float16_storage=f16, outliers=outliers,
                             max_block=max_block)
        out["builder"] = "traced (torch.export)"
        return out
    progress("[onnx] building the decoder with key/value cache from the packed formats (fused ONNX Runtime ops)")
    # MatMulNBits blocks = the artifact's groups: on SmolLM2 (RTN w4g128, 2 x 512 WikiText-2 tokens) 32-column
    # blocks gave the same ORT perplexity at accuracy_level 4 (38.493 vs 38.489; torch 38.353) for 26 MB more
    # resident memory, and the fused graph needs no activation-outlier split (38.52 with it).
    info = build_decoder(art, out_dir / DECODER_FILE, accuracy_level, max_block=None, binary=binary,
                         vq_lowrank=vq_lowrank, grid_bits=grid_bits, kernels=kernels)
    info["value_grid_bits"] = grid_bits
    info["ort_kernels"] = kernels
    if kernels == "lowbit":
        from lowbit.runtime.ort_ops import DOMAIN, VERSION

        info["custom_ops"] = {"domain": DOMAIN, "library_version": VERSION,
                              "build": "./scripts/build-ort-kernels (python -m lowbit.runtime.ort_ops build)"}
    lowerings = {}
    for rec in info["layers"].values():
        lowerings[rec["lowering"]] = lowerings.get(rec["lowering"], 0) + 1
    worst = max((r["rel_err"] for r in info["layers"].values()), default=0.0)
    progress(f"[onnx] {info['nodes']} nodes ({info['merged_matmulnbits']} q/k/v or gate/up merges); " + "; ".join(f"{n} x {k}" for k, n in lowerings.items())
             + f"; resident weights {info['ort_weight_bytes'] / 2**20:.1f} MiB for {info['packed_bytes'] / 2**20:.1f}"
             f" MiB packed; worst weight error of a lowering {worst:.2e}")
    info["lowerings"] = lowerings
    return info
