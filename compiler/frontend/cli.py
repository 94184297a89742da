"""Command-line tools: ``lowbit-compile`` and ``lowbit-run``."""

from __future__ import annotations

import argparse
import functools
import signal
import sys
import time

from lowbit.errors import LowbitError

EPILOG = """\
examples:
  lowbit-compile smollm2-135m --method gptq --bits 4 --group-size 128 --eval wikitext2
  lowbit-compile ./my-hf-model --method rtn --bits 3 --group-size 64 -o out/rtn3
  lowbit-compile model.gguf --method gptq --bits 2 --group-size 64 --act-order --eval wikitext2,c4 --eval-windows 32
  lowbit-compile smollm2-135m --method apiq --bits 2 --group-size 64 --lora-rank 8 --apiq-epochs 2
  lowbit-compile smollm2-135m --method efficientqat --bits 2 --group-size 64 --phases block-ap,e2e-qp
  lowbit-compile smollm2-135m --method billm --target onnx        # artifact + DIR/onnx/ for ONNX Runtime
  lowbit-export out/smollm2-135m-gptq-w4g128 --onnx                  # ONNX for an existing artifact
  lowbit-run out/smollm2-135m-gptq-w4g128 --prompt "The capital of France is"
  lowbit-run out/smollm2-135m-gptq-w4g128 --runtime onnxruntime --prompt "The capital of France is"

models: a Hugging Face directory (safetensors), a .gguf file, or the alias smollm2-135m (bundled).
data: c4 (documents 0-999 calibrate, 1000-1999 evaluate), wikitext2 (evaluation only), or a .txt/.jsonl file.
"""


def _terminations_as_interrupts():
    """SIGTERM and SIGHUP (timeout, kill, batch schedulers, container stops, a closed terminal) act like Ctrl-C:
    they raise KeyboardInterrupt, so staging folders are removed and the previous output stays as it was."""
    from lowbit.runtime.output_dir import signal_handlers

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    return signal_handlers((signal.SIGTERM, signal.SIGHUP), interrupt)


def _entry(prog: str):
    """A command-line entry point: terminations handled like Ctrl-C (exit 130, nothing half-written)."""
    def wrap(fn):
        @functools.wraps(fn)
        def main(argv=None) -> int:
            with _terminations_as_interrupts():
                try:
                    return fn(argv)
                except KeyboardInterrupt:
                    print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
                    return 130
        return main
    return wrap

def _compile_parser() -> argparse.ArgumentParser:
    from lowbit.passes.methods import REGISTRY, get_method

    get_method("rtn")
    p = argparse.ArgumentParser(
        prog="lowbit-compile",
        description="Compress a causal LM to low-bit packed weights: load, calibrate block by block, torch.export, "
        "rewrite every linear into a lowbit op, save an artifact directory with a report.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="HF model directory, .gguf file, or alias (smollm2-135m)")
    p.add_argument("--method", default="gptq", choices=sorted(REGISTRY),
                   help="gptq, rtn, billm (1-bit), apiq (2-4 bit + LoRA), efficientqat (Block-AP + E2E-QP), reallm (low-rank + "
                   "VQ under --bits-budget), sign "
                   "(naive 1-bit baseline); "
                        "default gptq")
    p.add_argument("--preset", default=None, choices=["paper"],
                   help="billm, apiq, efficientqat, reallm: the paper's algorithm variant, hyper-parameters and "
                        "calibration size instead of lowbit's defaults (flags you give still win; the report and "
                        "manifest list the preset, your overrides and what stands in for the paper's data)")
    q = p.add_argument_group("uniform quantization (rtn, gptq)")
    q.add_argument("--bits", type=int, default=None, help="bits per weight code, 1-8 (default 4)")
    q.add_argument("--group-size", type=int, default=None, help="columns per scale/zero group (default 128)")
    q.add_argument("--sym", action="store_true", default=None,
                   help="symmetric (no stored zero points); default asymmetric")
    g = p.add_argument_group("gptq")
    g.add_argument("--damp", type=float, default=None, help="Hessian damping as a fraction of mean diag (default 0.01)")
    g.add_argument("--gptq-block-size", type=int, default=None, help="lazy-update block size (default 128)")
    g.add_argument("--act-order", default=None, action=argparse.BooleanOptionalAction,
                   help="quantize columns in decreasing Hessian diagonal, static groups (default on)")
    b = p.add_argument_group("billm")
    b.add_argument("--billm-block-size", type=int, default=None, choices=[32, 64, 128, 256],
                   help="columns per binarization block (default 128)")
    b.add_argument("--billm-mean-shift", default=None, action=argparse.BooleanOptionalAction,
                   help="per-row mean shift of each binarized part (official code: on; paper: off)")
    b.add_argument("--billm-search-on", default=None, choices=["s", "w"],
                   help="measure search error on the salience matrix S (official code) or on W (paper)")
    b.add_argument("--billm-search-ranges", default=None, choices=["code", "paper"],
                   help="candidates: code = 1-49 columns, 81 quantiles; paper = 3-30 columns, 9 x max|W|")
    b.add_argument("--billm-search-rows", type=int, default=None,
                   help="rows sampled for the candidate searches (default 256; 0 = all)")
    b.add_argument("--billm-outlier-ratio", type=float, default=None,
                   help="keep input channels whose Hessian diagonal exceeds this x its median (massive "
                        "activations) as fp16 columns, at most 1/64 of the columns (default 100; 0 = the "
                        "paper's algorithm, everything binarized)")
    a = p.add_argument_group("apiq (uniform base + LoRA; --bits/--group-size/--sym apply, default w2g64)")
    a.add_argument("--apiq-mode", default=None, choices=["bw", "lw"],
                   help="bw: train each block's clipping + LoRA against the float block (default); lw: per linear")
    a.add_argument("--lora-init", default=None, choices=["apiq", "qlora", "loftq"],
                   help="apiq (trained, default); baselines: qlora (RTN base, B = 0) or loftq (quantize/SVD, data-free)")
    a.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (default 64, the paper's; 0 = no LoRA)")
    a.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha, scaling alpha/rank (default 16)")
    a.add_argument("--lora-targets", default=None,
                   help="comma-separated name patterns of the linears that get LoRA (default '*': all), "
                        "e.g. q_proj,v_proj")
    a.add_argument("--apiq-epochs", type=int, default=None, help="passes over the windows per block/layer (default 20)")
    a.add_argument("--apiq-lr-lwc", type=float, default=None, help="AdamW lr of the clipping logits (default 5e-3)")
    a.add_argument("--apiq-lr-lora", type=float, default=None, help="AdamW lr of the LoRA factors (default 5e-4)")
    a.add_argument("--apiq-aug-loss", default=None, action=argparse.BooleanOptionalAction,
                   help="also fit the float block's output on the quantized inputs (default off)")
    a.add_argument("--apiq-batch-size", type=int, default=None, help="windows per optimizer step (default 1)")
    a.add_argument("--loftq-iters", type=int, default=None, help="LoftQ alternations (default 5)")
    r = p.add_argument_group("reallm (low-rank + vector-quantized residual, configuration per matrix)")
    r.add_argument("--bits-budget", type=float, default=None,
                   help="true bits per weight, everything stored counted (codes, codebooks, scales, permutation, "
                        "low-rank factors); met by every block (default 3.0)")
    r.add_argument("--reallm-candidates", default=None,
                   help="'auto' (d2b4..d2b7 and d4b8 at g128, each rank of --reallm-ranks) or a comma list of "
                        "d<vec_dim>b<index_bits>g<group>r<rank>, e.g. d2b6g128r0,d4b8g64r8")
    r.add_argument("--reallm-ranks", default=None, help="low-rank ranks tried by 'auto' (default 0,8)")
    r.add_argument("--reallm-perm", default=None, choices=["act-order", "none"],
                   help="column reordering (default act-order: decreasing Hessian diagonal, stored as int16)")
    r.add_argument("--reallm-lq-iters", type=int, default=None, help="at most N low-rank / VQ alternations, stopped when the error grows (default 2)")
    r.add_argument("--reallm-kmeans-iters", type=int, default=None, help="k-means iterations (default 10)")
    r.add_argument("--reallm-block-epochs", type=int, default=None,
                   help="block-wise fine-tuning of the low-rank parts against the float block (default 0: off)")
    r.add_argument("--reallm-block-lr", type=float, default=None, help="its Adam lr (default 1e-4)")
    q = p.add_argument_group("efficientqat (uniform asymmetric; --bits/--group-size apply, default w2g64)")
    q.add_argument("--phases", default=None,
                   help="block-ap, e2e-qp, or both (default block-ap,e2e-qp); e2e-qp alone starts from min-max RTN")
    q.add_argument("--eqat-init", choices=["gptq", "minmax"], default=None,
                   help="Block-AP start: gptq (default; the codes of GPTQ act-order) or minmax (the paper's)")
    q.add_argument("--eqat-epochs", type=int, default=None, help="Block-AP passes over the windows (default 2)")
    q.add_argument("--eqat-batch-size", type=int, default=None, help="Block-AP windows per step (default 2)")
    q.add_argument("--eqat-lr-quant", type=float, default=None, help="Block-AP lr of scales/zeros (default 1e-5 from gptq, 1e-4 from minmax)")
    q.add_argument("--eqat-lr-weight", type=float, default=None,
                   help="Block-AP lr of the weights (default 2e-5 at 2 bits, else 1e-5)")
    q.add_argument("--eqat-val-windows", type=int, default=None,
                   help="calibration windows held out for validation losses (default 8, at most a quarter)")
    q.add_argument("--e2e-epochs", type=int, default=None, help="E2E-QP passes over the windows (default 1)")
    q.add_argument("--e2e-batch-size", type=int, default=None, help="E2E-QP windows per step (default 4)")
    q.add_argument("--e2e-lr", type=float, default=None, help="E2E-QP lr of the scales (default 2e-5 at 2 bits, else 1e-5)")
    q.add_argument("--checkpoint-every", type=int, default=None,
                   help="steps between checkpoints into OUTPUT.ckpt/ (default 16; finished blocks always)")
    p.add_argument("--resume", action="store_true",
                   help="efficientqat, reallm: continue an interrupted run from OUTPUT.ckpt/ (finished blocks are "
                        "replayed; same options and data: same artifact)")
    p.add_argument("--overrides", default=None, metavar="FILE",
                   help="per-module rules (.toml/.json): match a name pattern, then skip = true or other options, "
                        "e.g. keep lm_head and layers.0.* at 4 bits while the rest gets 2 (see README)")
    p.add_argument("--head", default="float", choices=["float", "4", "8"],
                   help="compress the output head to 4 or 8 bits (32-column groups; GPTQ unless the method is rtn "
                        "or gptq); a tied embedding then reads the same packed table. Default float: the head stays "
                        "out of the bit count, as peers keep it. For deployment: 8 costs no measurable perplexity "
                        "(SmolLM2 RTN w4g128: 30.05 vs 30.07) and makes ONNX Runtime decode ~1.3x faster in 0.56x "
                        "the peak memory of a float head; 4 (RTN) cost +11%% perplexity")
    p.add_argument("--stream", action="store_true",
                   help="block streaming for models larger than memory (a safetensors checkpoint, or a Llama GGUF): "
                        "the model is built on the meta device, each block's weights are read when its turn comes "
                        "and released after, "
                        "packed results go to a spill file; the whole float model is never resident. Same artifact. "
                        "Not with --head, end-to-end phases or a float perplexity (--eval runs the packed artifact)")
    p.add_argument("--device", default="cpu",
                   help="where blocks are calibrated: cpu (default), cuda, cuda:N, or auto (a GPU if torch sees one). "
                        "The model stays on the CPU (or streams, --stream); one block at a time moves to the device "
                        "with its calibration activations. Same artifact format; the manifest records the device. "
                        "GPTQ, RTN and sign run wholly there; BiLLM's layer solves run on the CPU; "
                        "apiq, efficientqat and reallm need --device cpu --compute-dtype float32 for now")
    p.add_argument("--activations", default="auto", choices=["auto", "device", "cpu", "disk"],
                   help="where the calibration activations (one tensor per window, two generations at once) live "
                        "between blocks: auto (default: the device if they fit in half its free memory, else CPU "
                        "memory on the same rule, else disk), device, cpu, or disk")
    p.add_argument("--offload-dir", default=None, metavar="DIR",
                   help="directory for activations on disk (implies --activations disk under auto; default: beside "
                        "the output). Unnamed temporary files, nothing left behind; checked for room first")
    p.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="precision of the block forwards during calibration (an autocast; activations cached in it). "
                        "Weights are quantized from their float32 values and Hessians are accumulated in float32 "
                        "or wider whatever this is (default float32)")
    c = p.add_argument_group("calibration data")
    c.add_argument("--calib", default="c4", help="c4 or a .txt/.jsonl file (default c4)")
    c.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 128)")
    c.add_argument("--seqlen", type=int, default=None, help="tokens per calibration window (default 512)")
    c.add_argument("--seed", type=int, default=None, help="seed for drawing windows (default 0)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval", default="", help="comma-separated: wikitext2, c4, or a file (default: none)")
    e.add_argument("--eval-windows", type=int, default=None, help="evaluate only the first N windows")
    e.add_argument("--eval-seqlen", type=int, default=2048, help="evaluation window length (default 2048)")
    e.add_argument("--no-eval-float", action="store_true", help="skip the float (before) perplexity")
    o = p.add_argument_group("output")
    o.add_argument("-o", "--output", default=None, help="artifact directory (default out/MODEL-METHOD-TAG)")
    o.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    o.add_argument("--target", default="torch", choices=["torch", "onnx", "mlir"], help="lowering (default torch)")
    o.add_argument("--accuracy-level", type=int, default=4, choices=[0, 1, 2, 3, 4],
                   help="--target onnx: MatMulNBits accuracy_level (4 = int8 activations, fastest on CPU; "
                        "0 = float activations, exact)")
    o.add_argument("--float-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="storage dtype of the parameters that stay float (default float16)")
    o.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    return p


@_entry("lowbit-compile")
def compile_main(argv=None) -> int:
    args = _compile_parser().parse_args(argv)
    from lowbit.compiler.frontend.pipeline import CompileOptions, compile_model, summary_text

    # Only the flags the user gave are passed; a method refuses options it does not take.
    flags = {"bits": "bits", "group_size": "group_size", "sym": "symmetric", "damp": "damp",
             "gptq_block_size": "block_size", "act_order": "act_order", "billm_block_size": "block_size",
             "billm_mean_shift": "mean_shift", "billm_search_on": "search_on",
             "billm_search_ranges": "search_ranges", "billm_search_rows": "search_rows",
             "billm_outlier_ratio": "outlier_ratio", "apiq_mode": "mode", "lora_init": "init",
             "lora_rank": "rank", "lora_alpha": "alpha", "lora_targets": "targets", "apiq_epochs": "epochs",
             "apiq_lr_lwc": "lr_lwc", "apiq_lr_lora": "lr_lora", "apiq_aug_loss": "aug_loss",
             "apiq_batch_size": "batch_size", "loftq_iters": "loftq_iters", "phases": "phases",
             "eqat_init": "init", "eqat_epochs": "epochs", "eqat_batch_size": "batch_size", "eqat_lr_quant": "lr_quant",
             "eqat_lr_weight": "lr_weight", "eqat_val_windows": "val_windows", "e2e_epochs": "e2e_epochs",
             "e2e_batch_size": "e2e_batch_size", "e2e_lr": "e2e_lr", "checkpoint_every": "checkpoint_every",
             "bits_budget": "bits_budget", "reallm_candidates": "candidates", "reallm_ranks": "ranks",
             "reallm_perm": "perm", "reallm_lq_iters": "lq_iters", "reallm_kmeans_iters": "kmeans_iters",
             "reallm_block_epochs": "block_epochs", "reallm_block_lr": "block_lr"}
    # Method-specific flags share option names (--apiq-epochs, --eqat-epochs): refuse them on another method.
    owner = {"billm_": "billm", "apiq_": "apiq", "lora_": "apiq", "loftq_": "apiq", "eqat_": "efficientqat",
             "e2e_": "efficientqat", "phases": "efficientqat", "checkpoint_every": "efficientqat",
             "bits_budget": "reallm", "reallm_": "reallm"}
    for flag in flags:
        m = next((v for k, v in owner.items() if flag.startswith(k)), None)
        if m and m != args.method and getattr(args, flag) is not None:
            print(f"lowbit-compile: error: --{flag.replace('_', '-')} applies to --method {m}, not {args.method}",
                  file=sys.stderr)
            return 2
    method_options = {key: getattr(args, flag) for flag, key in flags.items() if getattr(args, flag) is not None}
    from lowbit.passes.methods import presets

    given = {k: getattr(args, k) for k in ("nsamples", "seqlen", "seed") if getattr(args, k) is not None}
    try:
        method_options, calib, preset = presets.apply(args.preset, args.method, method_options, given)
    except ValueError as e:
        print(f"lowbit-compile: error: {e}", file=sys.stderr)
        return 2
    calib = {"nsamples": 128, "seqlen": 512, "seed": 0, **calib}
    opts = CompileOptions(
        model=args.model, method=args.method, method_options=method_options, output=args.output,
        overwrite=args.overwrite, target=args.target, calib=args.calib, nsamples=calib["nsamples"],
        seqlen=calib["seqlen"], seed=calib["seed"], preset=preset, eval=tuple(x for x in args.eval.split(",") if x),
        eval_windows=args.eval_windows, eval_seqlen=args.eval_seqlen, eval_float=not args.no_eval_float,
        float_dtype=args.float_dtype, progress=not args.quiet, onnx_accuracy_level=args.accuracy_level,
        overrides=args.overrides, resume=args.resume, head=args.head, stream=args.stream,
        device=args.device, compute_dtype=args.compute_dtype, activations=args.activations,
        offload_dir=args.offload_dir,
    )
    try:
        report = compile_model(opts)
    except LowbitError as e:
        print(f"lowbit-compile: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit-compile: interrupted; no artifact was written", file=sys.stderr)
        return 130
    if "rank" not in report:  # torchrun's other ranks: rank 0 prints the summary
        print(summary_text(report))
    return 0


@_entry("lowbit-run")
def run_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lowbit-run", description="Generate text from a lowbit artifact directory.")
    p.add_argument("artifact", help="artifact directory written by lowbit-compile")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runtime", default="torch", choices=["torch", "onnxruntime"],
                   help="torch (the artifact's program, no KV cache) or onnxruntime (DIR/onnx/decoder.onnx, "
                        "one token per step with a KV cache; greedy only); default torch")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime: intra-op threads (default: all cores)")
    args = p.parse_args(argv)
    if args.runtime == "onnxruntime":
        return _run_onnxruntime(args)

    import torch

    from lowbit.runtime.artifact import ArtifactError, load

    try:
        a = load(args.artifact)
    except ArtifactError as e:
        print(f"lowbit-run: error: {e}", file=sys.stderr)
        return 2
    tok = a.tokenizer
    ids = torch.tensor([tok(args.prompt)["input_ids"]], dtype=torch.long)
    if ids.shape[1] == 0:
        print("lowbit-run: error: the prompt encodes to no tokens", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(args.seed)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    shown = args.prompt
    start_len = ids.shape[1]
    t0 = time.perf_counter()
    # The torch program has no KV cache: each step recomputes the whole sequence.
    for _ in range(args.max_new_tokens):
        logits = a(ids)[0, -1].float()
        if args.temperature > 0:
            nxt = torch.multinomial(torch.softmax(logits / args.temperature, -1), 1, generator=gen)
        else:
            nxt = logits.argmax().view(1)
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        text = tok.decode(ids[0], skip_special_tokens=True)
        if text.startswith(shown):
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
        if tok.eos_token_id is not None and int(nxt) == tok.eos_token_id:
            break
    dt = time.perf_counter() - t0
    n = ids.shape[1] - start_len
    print(f"\n[lowbit-run] {n} tokens in {dt:.2f}s ({n / dt:.2f} tokens/s, no KV cache)", file=sys.stderr)
    return 0


def _run_onnxruntime(args) -> int:
    from pathlib import Path

    from transformers import AutoTokenizer

    from lowbit.runtime.onnx_runtime import OnnxModelError, OrtDecoder

    onnx_dir = Path(args.artifact) / "onnx"
    if not onnx_dir.is_dir():
        print(f"lowbit-run: error: {onnx_dir} not found (run: lowbit-export {args.artifact} --onnx)", file=sys.stderr)
        return 2
    if args.temperature > 0:
        print("lowbit-run: error: --runtime onnxruntime decodes greedily; drop --temperature", file=sys.stderr)
        return 2
    try:
        dec = OrtDecoder(onnx_dir, threads=args.threads)
    except (OnnxModelError, OSError, KeyError) as e:
        print(f"lowbit-run: error: {e}", file=sys.stderr)
        return 2
    tok = AutoTokenizer.from_pretrained(str(Path(args.artifact) / "tokenizer"))
    ids = tok(args.prompt)["input_ids"]
    if not ids:
        print("lowbit-run: error: the prompt encodes to no tokens", file=sys.stderr)
        return 2
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    state = {"ids": list(ids), "shown": args.prompt}

    def on_token(t):
        state["ids"].append(t)
        text = tok.decode(state["ids"], skip_special_tokens=True)
        if text.startswith(state["shown"]):
            sys.stdout.write(text[len(state["shown"]):])
            sys.stdout.flush()
            state["shown"] = text

    out, t_prefill, t_decode = dec.generate(ids, args.max_new_tokens, tok.eos_token_id, on_token)
    steps = max(len(out) - 1, 1)
    print(f"\n[lowbit-run] onnxruntime: prompt {len(ids)} tokens in {t_prefill:.2f}s; {len(out)} new tokens, "
          f"decode {steps / max(t_decode, 1e-9):.2f} tokens/s (KV cache)", file=sys.stderr)
    return 0


@_entry("lowbit-export")
def export_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lowbit-export",
                                description="Lower an existing lowbit artifact to another runtime's format.")
    p.add_argument("artifact", help="artifact directory written by lowbit-compile")
    p.add_argument("--onnx", action="store_true", help="write DIR/onnx/ (model.onnx, decoder.onnx with KV cache)")
    p.add_argument("--mlir", action="store_true",
                   help="write DIR/mlir/model.<dialect>.mlirbc through torch-mlir (lowbit ops decomposed into integer "
                        "unpacking + matmul; packed weights stay integer constants)")
    p.add_argument("--dialects", default="torch,linalg-on-tensors,tosa,stablehlo",
                   help="--mlir: comma-separated output dialects (default: all four; tosa/stablehlo are best effort)")
    p.add_argument("--static-shape", default="1,128",
                   help="--mlir: batch,sequence of the static-shape graph used for tosa and stablehlo (default 1,128)")
    p.add_argument("--accuracy-level", type=int, default=4, choices=[0, 1, 2, 3, 4],
                   help="MatMulNBits accuracy_level (4 = int8 activations, fastest on CPU; 0 = exact); with "
                        "--ort-kernels lowbit, 4 also gives BiLLM's BinaryMatMul int8 activations in decode (the "
                        "regular columns, per block; weights exact), 0 keeps it exact")
    p.add_argument("--no-matmulnbits", action="store_true",
                   help="keep every weight in lowbit-domain functions (no com.microsoft ops)")
    p.add_argument("--no-kv-cache", action="store_true", help="skip the decoder graph with key/value cache")
    p.add_argument("--decoder", default="auto", choices=["auto", "direct", "traced"],
                   help="the key/value-cache decoder: direct = built from the packed formats with ONNX Runtime's "
                        "fused ops (GroupQueryAttention, SkipSimplifiedLayerNormalization; Llama-type models, "
                        "onnxruntime-genai names), traced = torch.export capture (any architecture); auto = direct "
                        "where it applies (default)")
    p.add_argument("--billm-lowering", default="grid", choices=["grid", "exact"],
                   help="direct decoder: BiLLM weights on a grid per block (--value-grid-bits; one MatMulNBits, "
                        "weight error recorded in export.json; default) or exact (2-bit ternary "
                        "planes, ~2.5x the bytes, slower in ONNX Runtime 1.32)")
    p.add_argument("--vq-lowrank", default="fold", choices=["exact", "fold"],
                   help="direct decoder: a VQ (ReALLM) layer's low-rank term folded into its grid (default: "
                        "three nodes fewer per input; measured on ReALLM's d4b8g128r8 at SmolLM2's shapes, mean grid "
                        "error 0.096 vs 0.095 on the 4-bit grid, 459 vs 819 nodes; error recorded) or an exact float "
                        "MatMul pair")
    p.add_argument("--value-grid-bits", type=int, default=8, choices=[4, 8],
                   help="direct decoder: the MatMulNBits grid that values on no uniform grid (BiLLM's levels, VQ "
                        "codebook values x group scales) are rounded onto per block: 8 (default; ReALLM speed "
                        "artifacts in ORT vs torch, WikiText-2 4 x 2048: budget 3.0 +0.40%%, budget 2.5 +1.96%%) "
                        "or 4 (ORT's fastest kernel, ~1.4x the speed and ~0.6x the weights in memory, but +99.5%% "
                        "and +133%% on the same artifacts; README)")
    p.add_argument("--ort-kernels", default="stock", choices=["stock", "lowbit"],
                   help="direct decoder: stock = only ONNX Runtime's own ops (default; runs anywhere ORT runs); "
                        "lowbit = VQ (ReALLM) and BiLLM layers as lowbit.ort::VQMatMul / BinaryMatMul (q/k/v and "
                        "gate/up as one VQLinears / BinaryLinears node each), which read the packed codes and "
                        "planes (exact weights, about the packed bytes resident; BiLLM's decode takes int8 "
                        "activations at --accuracy-level 4, 0 keeps it exact) in lowbit's ONNX Runtime library; "
                        "build it first with ./scripts/build-ort-kernels")
    p.add_argument("--genai", action="store_true",
                   help="--onnx: also write genai_config.json and the tokenizer, so onnxruntime-genai loads DIR/onnx")
    p.add_argument("--outlier-data", default="c4",
                   help="text for finding massive activation channels, which accuracy_level 4 keeps out of its "
                        "int8 activation path (c4, a .txt/.jsonl file, or none; default c4)")
    p.add_argument("--gptq", default=None, metavar="OUT",
                   help="write a GPTQ checkpoint directory OUT (int32 qweight/qzeros, fp16 scales, g_idx; "
                        "config.json quantization_config) that GPTQModel, transformers and vLLM load")
    p.add_argument("--gptq-format", default="v1", choices=["v1", "v2"],
                   help="--gptq: v1 = checkpoint_format gptq (zero points stored minus 1; transformers/vLLM), "
                        "v2 = gptq_v2 (GPTQModel); default v1")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DIR/onnx (or --gptq OUT)")
    args = p.parse_args(argv)
    if not (args.onnx or args.mlir or args.gptq):
        print("lowbit-export: error: choose a target (--onnx, --mlir and/or --gptq OUT)", file=sys.stderr)
        return 2
    if args.gptq:
        from lowbit.compiler.lowering.gptq_checkpoint import export_gptq

        try:
            g = export_gptq(args.artifact, args.gptq, version=int(args.gptq_format[1]), overwrite=args.overwrite,
                            progress=lambda m: print(m, file=sys.stderr))
        except LowbitError as e:
            print(f"lowbit-export: error: {e}", file=sys.stderr)
            return 2
        print(f"lowbit-export: {args.artifact} -> {args.gptq}: GPTQ checkpoint ({g['checkpoint_format']}), "
              f"{g['layers']} layers w{g['bits']}g{g['group_size']}, {g['bytes'] / 2**20:.1f} MiB ({g['seconds']:.0f}s)")
        if not (args.onnx or args.mlir):
            return 0
    from lowbit.compiler.lowering.onnx_artifact import export_artifact
    from lowbit.runtime.artifact import ArtifactError

    if args.mlir:
        from lowbit.compiler.lowering import mlir

        try:
            shape = tuple(int(v) for v in args.static_shape.split(","))
            if len(shape) != 2 or min(shape) < 1:
                raise ValueError
        except ValueError:
            print(f"lowbit-export: error: --static-shape must be BATCH,SEQ (got {args.static_shape!r})", file=sys.stderr)
            return 2
        try:
            m = mlir.export_artifact(args.artifact, dialects=tuple(x for x in args.dialects.split(",") if x),
                                            overwrite=args.overwrite, static_shape=shape,
                                            progress=lambda msg: print(msg, file=sys.stderr))
        except (LowbitError, ArtifactError) as e:
            print(f"lowbit-export: error: {e}", file=sys.stderr)
            return 2
        for d, r in m["dialects"].items():
            if "error" in r:
                print(f"lowbit-export: {args.artifact}/mlir: {d}: not lowered ({r['error']})")
            else:
                print(f"lowbit-export: {args.artifact}/mlir/{r['file']}: {r['bytes'] / 2**20:.1f} MiB, constants "
                      + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in sorted(r["constants"].items())))
        if not args.onnx:
            return 0

    try:
        s = export_artifact(args.artifact, accuracy_level=args.accuracy_level, matmulnbits=not args.no_matmulnbits,
                            kv_cache=not args.no_kv_cache, overwrite=args.overwrite, outlier_data=args.outlier_data,
                            decoder=args.decoder, genai=args.genai, binary=args.billm_lowering,
                            vq_lowrank=args.vq_lowrank, grid_bits=args.value_grid_bits, kernels=args.ort_kernels,
                            progress=lambda m: print(m, file=sys.stderr))
    except (LowbitError, ArtifactError) as e:
        print(f"lowbit-export: error: {e}", file=sys.stderr)
        return 2
    size = sum(f["bytes"] for f in s["files"].values())
    nodes = s["nodes"]
    print(f"lowbit-export: {args.artifact}/onnx: {size / 2**20:.1f} MiB; "
          f"MatMulNBits {nodes.get('com.microsoft::MatMulNBits', 0)}, "
          f"lowbit functions {sum(v for k, v in nodes.items() if k.startswith('lowbit::'))}; "
          f"ORT vs torch max rel. logit error {s['check']['max_rel_err_vs_torch']:.2e} ({s['seconds']:.0f}s)")
    d = s.get("decoder")
    if d and "ort_weight_bytes" in d:
        print(f"lowbit-export: decoder.onnx ({d['builder']}): {d['nodes']} nodes, resident weights "
              f"{d['ort_weight_bytes'] / 2**20:.1f} MiB for {d['packed_bytes'] / 2**20:.1f} MiB packed, "
              f"max rel. logit error vs torch {s['check'].get('decoder_max_rel_err_vs_torch', float('nan')):.2e}"
              + ("; onnxruntime-genai folder" if s.get("genai") else ""))
        if str(d.get("head", {}).get("kind", "")).startswith("float"):
            # measured on SmolLM2 (RTN w4g128, WikiText-2 32 x 2048): float head 30.07, --head 8 30.05, --head 4 33.35
            mib = d["head"].get("ort_bytes", 0) / 2**20
            print(f"lowbit-export: note: the head is float32 in ONNX Runtime ({mib:.0f} MiB read per token); compile "
                  "with --head 8 (no measurable perplexity cost) or --head 4 to deploy it packed, with the embedding "
                  "reading the same table")
    return 0


@_entry("lowbit-finetune")
def finetune_main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="lowbit-finetune",
        description="Train the LoRA branches (--train lora, ApiQ), the group scales (--train scales, "
        "EfficientQAT's E2E-QP) or every continuous tensor (--train all: scales, VQ codebooks and low-rank factors) "
        "of a compiled artifact on text (next-token loss, or --distill from the float model). The packed codes stay "
        "frozen and packed; a new artifact is written at the end. Checkpoints every --checkpoint-every "
        "steps into OUTPUT.ckpt/; --resume continues an interrupted run with the same result.",
        epilog="example:\n  lowbit-finetune out/smollm2-135m-apiq-w2g64-r8-apiq-bw --data c4 --nsamples 256 "
               "-o out/apiq-ft --eval wikitext2 --eval-windows 32",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("artifact", help="artifact directory (with LoRA branches for --train lora: lowbit-compile "
                   "--method apiq)")
    p.add_argument("--train", choices=("lora", "scales", "all"), default="lora",
                   help="what trains: lora (LoRA / low-rank factors, default), scales (fp16 group scales; codes and "
                   "zeros frozen) or all (group scales, VQ codebooks and low-rank factors; codes frozen)")
    p.add_argument("--data", default="c4", help="c4 (documents 0-999) or a .txt/.jsonl file (default c4)")
    p.add_argument("-o", "--output", default=None, help="new artifact directory (default ARTIFACT-ft)")
    p.add_argument("--nsamples", type=int, default=256, help="training windows (default 256)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--val-samples", type=int, default=8, help="held-out windows for the validation loss (default 8)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the training windows (default 1)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per optimizer step (default 4)")
    p.add_argument("--lr", type=float, default=None, help="AdamW peak lr, 3%% warm-up then cosine (default: lora "
                   "and all 3e-4; scales 2e-5 at 2 bits, else 1e-5)")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default: lora and all 0.1, "
                   "scales 0)")
    p.add_argument("--grad-clip", type=float, default=None,
                   help="max gradient norm (default: lora none, scales and all 0.3)")
    p.add_argument("--lr-quant", type=float, default=None,
                   help="--train all: AdamW peak lr of the group scales (default 2e-5 at 2 bits, else 1e-5); --lr "
                   "is then the low-rank factors' and the codebooks' (neither scales nor codebooks decay)")
    p.add_argument("--distill", action="store_true",
                   help="loss: KL divergence to the float model's next-token distribution (the model the artifact "
                   "was compiled from, loaded again) instead of the next-token cross-entropy")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto: where training runs")
    p.add_argument("--seed", type=int, default=0, help="window draw and order (default 0)")
    p.add_argument("--checkpoint-every", type=int, default=16, help="steps between checkpoints (default 16)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT.ckpt/ if it exists")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="train N steps in this run, checkpoint and stop (continue later with --resume)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (and its checkpoint)")
    p.add_argument("--eval", default="", help="evaluate the new artifact: wikitext2, c4 or a file (comma-separated)")
    p.add_argument("--eval-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--eval-seqlen", type=int, default=2048, help="evaluation window length (default 2048)")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    from lowbit.compiler.training.finetune import FinetuneOptions, finetune

    opts = FinetuneOptions(
        artifact=args.artifact, train=args.train, output=args.output or args.artifact.rstrip("/") + "-ft", data=args.data,
        nsamples=args.nsamples, seqlen=args.seqlen, val_samples=args.val_samples, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed,
        lr_quant=args.lr_quant, distill=args.distill, device=args.device,
        checkpoint_every=args.checkpoint_every, resume=args.resume, overwrite=args.overwrite,
        stop_after=args.stop_after, eval=tuple(x for x in args.eval.split(",") if x), eval_windows=args.eval_windows,
        eval_seqlen=args.eval_seqlen, progress=not args.quiet)
    try:
        r = finetune(opts)
    except LowbitError as e:
        print(f"lowbit-finetune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit-finetune: interrupted; no artifact written (resume from the last checkpoint with --resume)",
              file=sys.stderr)
        return 130
    if r.get("stopped"):
        print(f"lowbit-finetune: stopped at step {r['step']}/{r['total_steps']}; checkpoint {r['checkpoint']}")
        return 0
    first = next((h["val_loss"] for h in r["history"] if "val_loss" in h), float("nan"))
    last = next((h["val_loss"] for h in reversed(r["history"]) if "val_loss" in h), float("nan"))
    print(f"lowbit-finetune: {opts.artifact} -> {opts.output}\n"
          f"  trained            : {r['steps']} steps, {r['trainable_params']:,} trainable parameters ({opts.train}), {r['time_s']:.0f}s\n"
          f"  validation loss    : {first:.4f} -> {last:.4f}")
    for e, v in r.get("eval", {}).items():
        b = f"{v['before']['ppl']:.3f} -> " if v.get("before") else ""
        print(f"  perplexity {e:<8}: {b}{v['after']['ppl']:.3f} ({v['after']['windows']} windows)")
    return 0


if __name__ == "__main__":
    sys.exit(compile_main())


@_entry("lowbit-import-gptq")
def import_gptq_main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="lowbit-import-gptq",
        description="Turn a GPTQ checkpoint directory (config.json with quantization_config, int32 qweight/qzeros, "
        "fp16 scales; desc_act=false) into a lowbit artifact with the same codes, zero points and scales.")
    p.add_argument("checkpoint", help="GPTQ checkpoint directory (e.g. written by lowbit-export --gptq)")
    p.add_argument("-o", "--output", required=True, help="artifact directory to write")
    p.add_argument("--float-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="storage dtype of the tensors that stay float (default float16)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = p.parse_args(argv)
    from lowbit.compiler.lowering.gptq_checkpoint import import_gptq

    try:
        r = import_gptq(args.checkpoint, args.output, overwrite=args.overwrite, float_dtype=args.float_dtype,
                        progress=lambda m: print(m, file=sys.stderr))
    except LowbitError as e:
        print(f"lowbit-import-gptq: error: {e}", file=sys.stderr)
        return 2
    print(f"lowbit-import-gptq: {args.checkpoint} -> {args.output}: {r['layers']} layers "
          f"w{r['bits']}g{r['group_size']} ({r['checkpoint_format']}), {r['seconds']:.0f}s")
    return 0
