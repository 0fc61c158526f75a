#!/usr/bin/env bash
# The full sweep on smollm2-135m under the benchmark protocol (the `full` grid: RTN/GPTQ/AWQ at 8/4/3/2
# bits, Wanda/SparseGPT at 50 %, 2:4 and 70 %, joint settings, the budget solver, the dial's settings).
# Resumable: the committed database holds the finished points; rerunning measures only the rest and
# rewrites the report. Containers (several GB) go to $CONTAINERS, outside the repository.
#   bash benchmarks/sweep_full.sh            # on 2 CPU cores: about 5 hours for all 34 points
# A second process can split the grid: run the same command with --grid FILE listing some of the
# same points (same protocol and calibration); each process skips what the other has finished.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/sweep_full
.venv/bin/compresslm sweep smollm2-135m --grid "${GRID:-full}" --db "$OUT/results.sqlite" --out "$OUT/report" \
    --containers "${CONTAINERS:-/tmp/compresslm-sweep-full}"
