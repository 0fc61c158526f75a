"""Pruning and joint pruning + quantization of the reference model under the benchmark protocol.

Calibration: 128 windows of 512 tokens from the shipped C4 sample, seed 0 (magnitude pruning uses
none). Evaluation: WikiText-2 raw test, GPTQ row protocol, ctx 2048, first 40 windows. Each point
is compressed, written as a .clm container, reloaded from that file and evaluated in its own
subprocess (see point_runner.py). Rerunning skips finished points.

    .venv/bin/python benchmarks/prune_table.py [--points 50%-wanda ...] [--limit 40]
"""

from __future__ import annotations

from pathlib import Path

import point_runner
from results_store import atomic_write

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "prune_table"
PATTERNS = ["50%", "60%", "70%", "80%", "2:4", "4:8"]
DEFAULT_POINTS = [
    *(f"{pattern}-{method}" for pattern in PATTERNS for method in ("magnitude", "wanda", "sparsegpt")),
    # layer-wise allocation at 70 %: uniform rows are above
    "70%-wanda-owl",
    "70%-sparsegpt-owl",
    # sparsity and 4-bit quantization in one calibration pass, in both orders
    "2:4-sparsegpt+w4-g64-gptq",
    "w4-g64-gptq+2:4-sparsegpt",
    "50%-sparsegpt+w4-g64-gptq",
    "w4-g64-gptq+50%-sparsegpt",
]


def write_markdown(rows: dict, baseline: float | None, results: Path = RESULTS) -> None:
    p = next(iter(rows.values()))["eval_protocol"]
    lines = [
        "# Pruning of `smollm2-135m` (benchmark protocol)",
        "",
        f"Eval: WikiText-2 raw test, GPTQ rows, ctx {p['ctx']}, first {p['windows']} windows "
        f"({p['tokens_scored']:,} tokens), float32 compute, measured on the model **reloaded from its .clm file**.",
        "Calibration (Wanda, SparseGPT, GPTQ): 128 × 512-token windows from the shipped C4 train sample, seed 0.",
        "Unstructured ratios are per output row (each row loses the same share); N:M keeps N of every M inputs.",
        "`A+B` applies A, then B, in one calibration pass: `2:4-sparsegpt+w4-g64-gptq` prunes and quantizes in",
        "one SparseGPT sweep; `w4-g64-gptq+2:4-sparsegpt` quantizes with GPTQ, then prunes the quantized weights",
        "by SparseGPT's saliency (kept weights keep their codes). `-owl`: outlier-weighted layer-wise ratios",
        "(block ratios 70 % ± 8 %, same global ratio).",
        "Sparse weights store only their kept values (float16) or codes, plus the mask: a bitmask, or for N:M",
        "the rank of each group's pattern (2:4: 3 bits per 4 weights). Bits/param count every byte of the file.",
        "",
        f"Uncompressed float32 reference under the same protocol: ppl {baseline:.4f}." if baseline else "",
        "",
        "| recipe | ppl | Δ vs fp32 | pruned (linears) | bits/param (file) | linear bits/param | bytes on disk "
        "| compress s | peak RSS MiB (compress / whole point) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows.values():
        delta = f"{100 * (row['ppl'] / baseline - 1):+.1f} %" if baseline else ""
        lines.append(
            f"| {row['point']} | {row['ppl']:.3f} | {delta} | {100 * row['linear_sparsity']:.1f} % "
            f"| {row['bits_per_param']:.3f} | {row['linear_bits_per_param']:.3f} | {row['bytes_on_disk']:,} "
            f"| {row['compress_seconds']:.0f} | {point_runner.rss_cell(row)} |"
        )
    lines += point_runner.footer(rows, point_runner.command_line("benchmarks/prune_table.py"))
    atomic_write(results.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    point_runner.main(__file__, RESULTS, DEFAULT_POINTS, write_markdown)
