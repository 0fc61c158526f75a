"""Does GPTQ give the same codes with 1 and 2 torch threads? (It need not: float sums reorder.)

One synthetic layer (1536×576 weight, 4096 correlated inputs, W3 g64 asymmetric), compressed with
each thread count; the table counts the codes that differ. Explains why a table measured with one
thread can differ from one measured with two under the same recipe and protocol.

    .venv/bin/python benchmarks/thread_determinism.py
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
from results_store import atomic_write

from compresslm.quant.gptq import gptq, hessian_from_inputs
from compresslm.quant.grid import Grid
from compresslm.versions import versions

RESULTS = Path(__file__).parent / "results" / "thread_determinism"


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(4096, 576, generator=generator) @ torch.randn(576, 576, generator=generator) * 0.1
    weight = torch.randn(1536, 576, generator=generator) * 0.02
    threads_before = torch.get_num_threads()
    runs = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        hessian = hessian_from_inputs(inputs)
        runs[threads] = (hessian, gptq(weight, hessian, Grid(3, "group", 64)))
    torch.set_num_threads(threads_before)
    (h1, r1), (h2, r2) = runs[1], runs[2]
    row = {
        "hessian_max_abs_difference": float((h1 - h2).abs().max()),
        "codes_differing": int((r1.codes != r2.codes).sum()),
        "codes": r1.codes.numel(),
        "versions": versions(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads available",
    }
    atomic_write(RESULTS.with_suffix(".json"), json.dumps(row, indent=2) + "\n")
    atomic_write(RESULTS.with_suffix(".md"), "\n".join([
        "# GPTQ codes with 1 and 2 torch threads",
        "",
        "| layer | Hessian max abs difference | codes differing |",
        "|---|---:|---:|",
        f"| synthetic 1536×576, W3 g64 | {row['hessian_max_abs_difference']:.3g} | "
        f"{row['codes_differing']:,} of {row['codes']:,} |",
        "",
        f"Command: `.venv/bin/python benchmarks/thread_determinism.py`. Machine: {row['machine']}; "
        f"torch {row['versions']['torch']}.",
    ]) + "\n")  # fmt: skip
    print(RESULTS.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
