"""``--preset paper``: each method's paper setup (algorithm variant, hyper-parameters, calibration size).

lowbit's defaults are its best settings (they differ from the papers where measurements said so, see README
"Methods"); ``--preset paper`` sets the papers' instead, as ``shared/reference/methods.md`` records them (where
paper and official code differ, the paper's; where the paper is silent, the official code's). Flags the user gives
win over the preset and are recorded as such. Every preset lists the deviations that remain whatever the flags:
data that is not available here (RedPajama) and what stands in, precision, parts lowbit does not implement.

A preset is plain data: method options (the method's ``Config`` field names), calibration settings (``nsamples``,
``seqlen``, ``seed``) and deviation strings. The report and the manifest record it under ``method.preset``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    method: str
    source: str
    options: dict
    calibration: dict
    deviations: tuple = field(default_factory=tuple)


_C4 = ("calibration text: C4 validation documents 0-999 (lowbit's calibration split; evaluation never reads them)")
_FP32 = "training and solves in float32 on the CPU (the official code uses fp16/bf16 autocast on a GPU)"

PAPER = {
    "billm": Preset(
        "billm", "BiLLM (arXiv 2402.04291) section 3, Algorithms 1-2; calibration from the official run.py",
        options={"block_size": 128, "mean_shift": False, "search_on": "w", "search_ranges": "paper", "damp": 0.01,
                 "search_rows": 0, "outlier_ratio": 0.0},
        calibration={"nsamples": 128, "seqlen": 2048, "seed": 0},
        deviations=(
            _C4 + "; the official code draws 2048-token windows from C4 train shard 00000 (the paper names no set)",
            "salience: the Hessian metric (the paper's and the README commands'; the code's default is magnitude)",
            "weights binarized in float32 (the official code works in fp16)",
        )),
    "apiq": Preset(
        "apiq", "ApiQ (arXiv 2402.05147), ApiQ-bw as in the official scripts/quantize.sh and calibrate.py",
        options={"bits": 2, "group_size": 64, "symmetric": False, "mode": "bw", "init": "apiq", "rank": 64,
                 "alpha": 16.0, "targets": "*", "epochs": 20, "lr_lwc": 5e-3, "lr_lora": 5e-4, "weight_decay": 0.1,
                 "batch_size": 1},
        calibration={"nsamples": 128, "seqlen": 2048, "seed": 2},
        deviations=(
            _C4 + "; the official code calibrates on WikiText-2 train by default, which lowbit refuses (WikiText-2 "
                  "is the evaluation set)",
            "asymmetric quantization, as the paper's reported numbers (the quantize script passes --symmetric)",
            _FP32,
        )),
    "efficientqat": Preset(
        "efficientqat", "EfficientQAT (arXiv 2407.11062) section 4 and appendix B; official main_block_ap.py and "
                        "main_e2e_qp.py",
        options={"bits": 2, "group_size": 64, "phases": "block-ap,e2e-qp", "init": "minmax", "epochs": 2,
                 "batch_size": 2, "lr_quant": 1e-4, "lr_weight": None, "min_lr_factor": 20.0, "val_windows": 64,
                 "e2e_epochs": 1, "e2e_batch_size": 32, "e2e_lr": None, "e2e_grad_clip": 0.3},
        calibration={"nsamples": 4096, "seqlen": 2048, "seed": 2},
        deviations=(
            "RedPajama-Data-1T-Sample is not available here: " + _C4 + " stand in for Block-AP's 4096 x 2048 "
            "windows (500k SmolLM2 tokens, 32 documents longer than 2048 tokens: windows are drawn from those and "
            "overlap)",
            "E2E-QP trains on the Block-AP windows (the paper: 4096 x 4096 RedPajama tokens) with one batch of "
            "32 windows per step (the paper: 4 x 8 gradient accumulation)",
            "the 64 validation windows are held out of the calibration windows (the paper: from the last 10% of "
            "documents), and the parameters with the lowest validation loss are kept (the paper keeps the last step; "
            "early stopping is off there)",
            _FP32,
        )),
    "reallm": Preset(
        "reallm", "ReALLM (arXiv 2405.13155) as in the official run_vqdora.py (nf2: 2-D vectors, 16 codewords, "
                  "rank 64) and run_per_bloc.py (block-wise fine-tuning)",
        options={"candidates": "d2b4g64r64", "bits_budget": 8.0, "perm": "none", "lq_iters": 100,
                 "kmeans_iters": 20, "block_epochs": 200, "block_lr": 1e-5, "block_batch_size": 32},
        calibration={"nsamples": 1024, "seqlen": 4096, "seed": 0},
        deviations=(
            _C4 + " (the official code: C4 train; only 8 of these documents exceed 4096 SmolLM2 tokens, so the "
            "1024 windows overlap)",
            "one configuration for every matrix (d2b4g64r64; the budget only has to admit it)",
            "vectors are 2 consecutive input columns with one fp16 scale per 64 (the code: 2 consecutive rows, "
            "double-quantized absmax scales per 64) and the greedy smoothness permutation per 64-row block is not "
            "implemented (no permutation)",
            "the low-rank part is a plain LoRA pair trained block-wise (the code: DoRA, with magnitudes)",
            "the VQ residual is built with GPTQ-style error feedback and the rank-64 part from a data-aware SVD (the "
            "code: data-free LQ-LoRA alternation; both stop when the error grows, at most 100 alternations here)",
            "block fine-tuning keeps the factors with the lowest held-out loss over 200 epochs (the code: early stop "
            "after 3 epochs without improvement)",
            "the HNeRV neural decoder is not implemented",
            _FP32,
        )),
}


def apply(name: str | None, method: str, user_options: dict, user_calibration: dict) -> tuple[dict, dict, dict | None]:
    """``(method options, calibration settings, record)`` for ``--preset name``; the user's values win.

    ``user_calibration`` holds only the calibration flags the user gave. ``record`` (None without a preset) goes
    into the report and the manifest: the preset, its source, the settings it applied, the user's overrides of
    it, and the deviations."""
    if name is None:
        return dict(user_options), dict(user_calibration), None
    if name != "paper":
        raise ValueError(f"--preset must be 'paper', got {name!r}")
    if method not in PAPER:
        raise ValueError(f"--preset paper applies to {', '.join(sorted(PAPER))}; {method} has no paper preset "
                         "(its defaults are the reference algorithm)")
    p = PAPER[method]
    options = {**p.options, **user_options}
    calibration = {**p.calibration, **user_calibration}
    overridden = {k: {"paper": v, "used": user_options[k]} for k, v in p.options.items()
                  if k in user_options and user_options[k] != v}
    overridden.update({k: {"paper": v, "used": user_calibration[k]} for k, v in p.calibration.items()
                       if k in user_calibration and user_calibration[k] != v})
    record = {"name": "paper", "source": p.source, "options": dict(p.options), "calibration": dict(p.calibration),
              "overridden_by_user": overridden, "deviations": list(p.deviations)}
    return options, calibration, record
