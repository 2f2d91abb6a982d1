#!/usr/bin/env bash
# The 30-minute soak: benchmarks/load_test.py --soak (a phase per scheduling policy, shared
# prompt prefixes, in-place adapter updates, hot loads and unloads, disconnects, and the
# resident-memory check) against the demo model on loopback, on the CPU or a GPU.
#
#   bash benchmarks/soak.sh                            # 1800 s, 64 clients
#   DURATION=600 CLIENTS=16 bash benchmarks/soak.sh    # shorter, fewer clients
#   bash benchmarks/soak.sh --num-pages 2048           # anything else goes to load_test.py
#
# The summary lands in $OUT/soak.json (default benchmarks/results/soak), the printed progress
# and table in $OUT/soak.log; the exit status is the load test's (0: pass).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-benchmarks/results/soak}
mkdir -p "$OUT"

"$PYTHON" benchmarks/load_test.py --soak \
    --duration "${DURATION:-1800}" --clients "${CLIENTS:-64}" \
    --json "$OUT/soak.json" "$@" 2>&1 | tee "$OUT/soak.log"
