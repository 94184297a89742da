#!/usr/bin/env bash
# The measurement protocol of shared/DESIGN.md for the uniform methods on SmolLM2-135M:
# float, RTN and GPTQ at w4g128, w3g128, w2g64; calibration C4 128 x 512 (seed 0); WikiText-2, 32 windows x 2048.
# Writes artifacts under ${OUT:-out/protocol} and prints the table. About 60-80 min on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/protocol}
mkdir -p "$OUT"
run() {
  name=$1; shift
  .venv/bin/lowbit-compile smollm2-135m --eval wikitext2 --eval-windows 32 -o "$OUT/$name" --overwrite "$@" \
      2> "$OUT/$name.log"
}
run gptq-w4g128 --method gptq --bits 4 --group-size 128            # also measures float (before)
run rtn-w4g128  --method rtn  --bits 4 --group-size 128 --no-eval-float
run gptq-w3g128 --method gptq --bits 3 --group-size 128 --no-eval-float
run rtn-w3g128  --method rtn  --bits 3 --group-size 128 --no-eval-float
run gptq-w2g64  --method gptq --bits 2 --group-size 64  --no-eval-float
run rtn-w2g64   --method rtn  --bits 2 --group-size 64  --no-eval-float
.venv/bin/python benchmarks/results_table.py "$OUT"/*/
