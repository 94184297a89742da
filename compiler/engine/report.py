"""Reports: ``report.json`` (everything), ``report.md`` (for people), ``layer_error.png`` (SQNR per layer)
and ``layer_bits.png`` (true bits per weight per layer)."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def write_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    names = list(layers)
    sq = [layers[n].get("sqnr_db", float("nan")) for n in names]
    sq = [min(s, 80.0) if not math.isnan(s) else float("nan") for s in sq]
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.08), 3.5))
    ax.plot(range(len(names)), sq, marker=".", linewidth=0.8)
    ax.set_xlabel("compressed linear (graph order)")
    ax.set_ylabel("output SQNR vs float (dB)")
    ax.set_title(f"{report['model']['id']}  {report['method']['method']} {report['method'].get('tag', '')}")
    kinds = sorted({n.split(".")[-1] for n in names})
    if len(names) <= 40:
        ax.set_xticks(range(len(names)), [n.split(".", 2)[-1] for n in names], rotation=90, fontsize=6)
    ax.grid(alpha=0.3)
    ax.text(0.01, 0.02, "kinds: " + ", ".join(kinds), transform=ax.transAxes, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_bits_plot(report: dict, path: Path) -> None:
    """True bits per weight of every compressed linear (what a per-matrix allocation such as ReALLM's
    chose), with the model's average as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    names = list(layers)
    bits = [layers[n]["bits_per_weight"] for n in names]
    kinds = sorted({n.split(".")[-1] for n in names})
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.08), 3.5))
    for kind in kinds:
        xs = [i for i, n in enumerate(names) if n.split(".")[-1] == kind]
        ax.scatter(xs, [bits[i] for i in xs], s=10, label=kind)
    ax.axhline(report["summary"]["bits_per_weight"], color="k", linewidth=0.8, linestyle="--", label="average")
    ax.set_xlabel("compressed linear (graph order)")
    ax.set_ylabel("true bits per weight")
    ax.set_title(f"{report['model']['id']}  {report['method']['method']} {report['method'].get('tag', '')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(report: dict) -> str:
    s = report["summary"]
    lines = [f"# lowbit report: {report['model']['id']} / {report['method']['method']} {report['method'].get('tag', '')}", ""]
    lines += ["| | |", "|---|---|"]
    lines.append(f"| compressed linears | {s['compressed_linears']} ({s['compressed_params']:,} weights) |")
    lines.append(f"| bits per weight (everything stored) | {s['bits_per_weight']:.3f} |")
    lines.append(f"| bits per weight (codes/signs only, the papers' count) | {s['code_bits_per_weight']:.3f} |")
    lines.append(f"| compressed linears: fp16 → packed | {_fmt_bytes(s['linears_fp16_bytes'])} → {_fmt_bytes(s['linears_packed_bytes'])} |")
    lines.append(f"| float checkpoint (fp16 / fp32) | {_fmt_bytes(s['float_fp16_bytes'])} / {_fmt_bytes(s['float_fp32_bytes'])} |")
    lines.append(f"| artifact on disk | {_fmt_bytes(s['artifact_bytes'])} |")
    for k, v in report.get("eval", {}).items():
        before = v.get("before", {}).get("ppl")
        after = v.get("after", {}).get("ppl")
        lines.append(f"| perplexity {k} ({v.get('after', v.get('before', {})).get('windows')} x {v.get('after', v.get('before', {})).get('seqlen')}) "
                     f"| {before if before is None else f'{before:.3f}'} → {after if after is None else f'{after:.3f}'} |")
    for k, v in report["times"].items():
        lines.append(f"| time: {k} | {v:.1f} s |")
    lines += ["", "## Passes", ""]
    for p in report["passes"]:
        ch = ", ".join(f"{k}: {v}" for k, v in p["changed"].items()) or "no changes"
        lines.append(f"- **{p['name']}**: {ch}")
        for sk in p["skipped"]:
            lines.append(f"  - skipped `{sk['site']}`: {sk['reason']}")
    lines += ["", "## Layers", "", "| layer | format | shape | bits | group/block | configuration | bytes | bits/weight | SQNR (dB) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, l in report["layers"].items():
        conf = l.get("reallm_config") or (f"rank {l['rank']}" if l.get("rank") else "")
        lines.append(f"| {name} | {l['kind']} | {l['out_features']}x{l['in_features']} | {l['bits']} | {l['group_size']} | "
                     f"{conf} | {l['nbytes']} | {l['bits_per_weight']:.3f} | {l.get('sqnr_db', float('nan')):.2f} |")
    lines += ["", "![per-layer error](layer_error.png)", "", "![bits per layer](layer_bits.png)", ""]
    return "\n".join(lines)


def write(report: dict, directory: Path) -> None:
    directory = Path(directory)
    (directory / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (directory / "report.md").write_text(markdown(report))
    write_plot(report, directory / "layer_error.png")
    write_bits_plot(report, directory / "layer_bits.png")
