#!/usr/bin/env bash
# The measurement protocol of shared/DESIGN.md for the uniform methods on SmolLM2-135M (float, RTN and GPTQ at
# w4g128, w3g128, w2g64), through benchmarks/reproduce.py (which runs, records and resumes every README row).
# About 60-80 min on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python benchmarks/reproduce.py float gptq-w4g128 rtn-w4g128 gptq-w3g128 rtn-w3g128 gptq-w2g64 rtn-w2g64 "$@"
