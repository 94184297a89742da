"""Print a Markdown table of perplexity, true bits and times from artifact directories' report.json.

Usage: python benchmarks/results_table.py DIR [DIR ...]
"""

import json
import sys
from pathlib import Path


def main(dirs):
    rows, float_row = [], None
    for d in dirs:
        p = Path(d) / "report.json"
        if not p.is_file():
            print(f"skipping {d}: no report.json", file=sys.stderr)
            continue
        r = json.loads(p.read_text())
        s = r["summary"]
        for name, ev in r.get("eval", {}).items():
            if "before" in ev and float_row is None:
                b = ev["before"]
                float_row = f"| float (fp32) | 32 | 32 | {b['ppl']:.2f} | {b['windows']}x{b['seqlen']} | | |"
            a = ev.get("after")
            if not a:
                continue
            t = r["times"]
            label = r["method"]["tag"] + (" act-order" if r["method"].get("act_order") else "")
            rows.append((label, r["method"]["method"],
                         f"| {r['method']['method']} {label} | {s['code_bits_per_weight']:.3f} | "
                         f"{s['bits_per_weight_on_disk']:.3f} | {a['ppl']:.2f} | {a['windows']}x{a['seqlen']} | "
                         f"{t.get('calibrate', 0):.0f} | {s['packed_file_bytes'] / 2**20:.1f} |"))
    print("| model | code bits | true bits/weight (disk) | WikiText-2 ppl | windows | calibrate (s) | packed linears (MiB) |")
    print("|---|---|---|---|---|---|---|")
    if float_row:
        print(float_row)
    for _, _, line in sorted(rows, key=lambda x: (x[0], x[1])):
        print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
