"""Low-rank factorization on the reference model under the benchmark protocol of DESIGN.md.

Every linear layer of the blocks is replaced by float16 factors that remove 10, 20, 30 or 40 % of its
parameters, chosen by plain truncated SVD, ASVD (activation-scaled, α = 0.5) or SVD-LLM's whitened
truncation. Calibration: 128 windows of 512 tokens from the shipped C4 sample, seed 0 (SVD uses none).
Evaluation: WikiText-2 raw test, GPTQ row protocol, ctx 2048, first 40 windows. Each point is
compressed, written as a .clm container, reloaded from that file and evaluated in its own
subprocess (see point_runner.py). Rerunning skips finished points.

    .venv/bin/python benchmarks/lowrank_table.py [--points 20%-whitened ...] [--limit 40]
"""

from __future__ import annotations

from pathlib import Path

import point_runner
from results_store import atomic_write

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "lowrank_table"
RATIOS = (10, 20, 30, 40)
METHODS = ("svd", "asvd", "whitened")
ORIGINAL = "[propagate=original]"  # every block whitened on the uncompressed model's inputs, as SVD-LLM and ASVD do


def point_name(ratio: int, method: str) -> str:
    return f"{ratio}%-{method}" + ("" if method == "svd" else ORIGINAL)


DEFAULT_POINTS = [point_name(ratio, method) for ratio in RATIOS for method in METHODS]


def _matrix(rows: dict, baseline: float | None) -> list[str]:
    lines = [
        "| parameters removed | SVD | ASVD | SVD-LLM (whitened) | whitened beats ASVD |",
        "|---|---:|---:|---:|---|",
    ]
    for ratio in RATIOS:
        ppl = {m: rows[point_name(ratio, m)]["ppl"] for m in METHODS if point_name(ratio, m) in rows}
        cells = [f"{ppl[m]:,.2f}" if m in ppl else "" for m in METHODS]
        verdict = ("yes" if ppl["whitened"] < ppl["asvd"] else "no") if {"whitened", "asvd"} <= set(ppl) else ""
        lines.append(f"| {ratio} % | {' | '.join(cells)} | {verdict} |")
    if baseline:
        lines.append(f"| 0 % (float32) | {baseline:.2f} | {baseline:.2f} | {baseline:.2f} | |")
    return lines


def _sequential_note(rows: dict) -> list[str]:
    """The whitened method calibrated block by block on the factorized model's outputs, where measured."""
    notes = []
    for ratio in RATIOS:
        sequential, original = rows.get(f"{ratio}%-whitened"), rows.get(point_name(ratio, "whitened"))
        if sequential and original:
            notes.append(f"at {ratio} %: {sequential['ppl']:,.2f} sequential against {original['ppl']:,.2f}")
    if not notes:
        return []
    return [
        "Whitened with each block calibrated on the outputs of the blocks already factorized (the sequential",
        f"default of compresslm's other methods) instead of the uncompressed model's: {'; '.join(notes)}.",
        "",
    ]


def write_markdown(rows: dict, baseline: float | None, results: Path = RESULTS) -> None:
    p = next(iter(rows.values()))["eval_protocol"]
    lines = [
        "# Low-rank factorization of `smollm2-135m` (benchmark protocol)",
        "",
        f"Eval: WikiText-2 raw test, GPTQ rows, ctx {p['ctx']}, first {p['windows']} windows "
        f"({p['tokens_scored']:,} tokens), float32 compute, measured on the model **reloaded from its .clm file**.",
        "Every linear layer of the 30 blocks (q, k, v, o, gate, up, down) is replaced by float16 factors A·B whose",
        "rank removes the row's share of that layer's parameters; the embedding (tied with the head) and the norms",
        "stay as they were. Calibration (ASVD, whitened): 128 × 512-token windows from the shipped C4 train sample,",
        "seed 0; `[propagate=original]`: every block's statistics come from the uncompressed model (as SVD-LLM and",
        "ASVD compute them; one pass, cached and shared by those points), otherwise each block is calibrated on the",
        "outputs of the blocks already factorized. ASVD scales input channels",
        "by their calibration RMS to the power 0.5 (from XᵀX's diagonal); the whitened method is SVD-LLM's",
        "truncation-aware whitening (Cholesky factor of XᵀX, damping 0.01 of its mean diagonal), without its",
        "parameter update by fine-tuning.",
        "",
        f"Uncompressed float32 reference under the same protocol: ppl {baseline:.4f}." if baseline else "",
        "",
        "## Perplexity by method and parameters removed",
        "",
        *_matrix(rows, baseline),
        "",
        *_sequential_note(rows),
        "## Every point",
        "",
        "| recipe | ppl | Δ vs fp32 | linear parameters kept | bits/param (file) | bytes on disk "
        "| mean layer output error | compress s | peak RSS MiB (compress / whole point) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows.values():
        delta = f"{100 * (row['ppl'] / baseline - 1):+,.1f} %" if baseline else ""
        kept = row["linear_bits_per_param"] / 16  # float16 factors: 16 bits per kept parameter
        error = row.get("mean_layer_relative_error")
        lines.append(
            f"| {row['point']} | {row['ppl']:,.2f} | {delta} | {100 * kept:.1f} % | {row['bits_per_param']:.3f} "
            f"| {row['bytes_on_disk']:,} | {'' if error is None else f'{error:.4f}'} | {row['compress_seconds']:.0f} "
            f"| {point_runner.rss_cell(row)} |"
        )
    lines += [
        "",
        "'mean layer output error' is each layer's relative output error on its calibration inputs, averaged over",
        "the 210 layers (SVD uses no calibration and reports none). The points ran while test runs and another",
        "benchmark queue shared the two cores: compress times are not comparable between rows.",
    ]
    lines += point_runner.footer(rows, point_runner.command_line("benchmarks/lowrank_table.py"))
    atomic_write(results.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    point_runner.main(__file__, RESULTS, DEFAULT_POINTS, write_markdown)
