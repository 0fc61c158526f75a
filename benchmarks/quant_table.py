"""Weight quantization on the reference model under the benchmark protocol of DESIGN.md.

Calibration: 128 windows of 512 tokens from the shipped C4 sample, seed 0. Evaluation: WikiText-2
raw test, GPTQ row protocol, ctx 2048, first 40 windows (81,880 predicted tokens). Each point is
compressed, written as a .clm container, reloaded from that file and evaluated, in its own
subprocess so that its peak RSS is its own (see point_runner.py). Rerunning skips finished points.

    .venv/bin/python benchmarks/quant_table.py [--points w4-g64-gptq ...] [--limit 40]
"""

from __future__ import annotations

import json
from pathlib import Path

import point_runner
from results_store import atomic_write

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "quant_table"
DEFAULT_POINTS = [
    "w8-rtn",
    "w8-gptq",
    "w8-awq",
    "w4-g32-rtn",
    "w4-g32-gptq",
    "w4-g32-awq",
    "w4-g64-rtn",
    "w4-g64-gptq-noact",
    "w4-g64-gptq",
    "w4-g64-awq",
    "w4-g128-rtn",
    "w4-g128-gptq",
    "w4-g128-awq",
    "w3-g32-rtn",
    "w3-g32-gptq",
    "w3-g32-awq",
    "w3-g64-rtn",
    "w3-g64-gptq",
    "w3-g64-awq",
    "w3-g128-rtn",
    "w3-g128-gptq",
    "w3-g128-awq",
    "w2-g32-rtn",
    "w2-g32-gptq",
    "w2-g32-awq",
    "w2-g64-rtn",
    "w2-g64-gptq",
    "w2-g64-awq",
    "w8a8-rtn",
    "w8a8-smoothquant",
    # combinations, towards the best W4 at <= 4.6 linear bits
    "w4-g64-gptq-awq",
    "w4-g64-gptq-awq-clip",
    "w4-g48-gptq-awq",
    "w4-g48-gptq-awq-clip",
    "w4-g32-gptq-awq-sym",
    # mixed precision by the budget solver (2-8 bits per layer) at 4.6 bits per linear weight
    "w4-g64-gptq-awq@4.6:output",
    "w4-g64-gptq-awq@4.6",
    "w4-g48-gptq-awq@4.6",
    # every block calibrated on the uncompressed model: one pass per block, statistics cached and reused
    "w4-g64-gptq[propagate=original]",
    "w3-g64-gptq[propagate=original]",
    "w4-g64-gptq-awq[propagate=original]",
    # rotations (QuaRot-style, folded into the weights) against the same recipes without, and SmoothQuant;
    # statistics from the uncompressed (rotated or not) model, computed once per model and shared
    "rot+w3-g64-gptq[propagate=original]",
    "w2-g64-gptq[propagate=original]",
    "rot+w2-g64-gptq[propagate=original]",
    "w4a8-g64-gptq[propagate=original]",
    "w4a8-g64-gptq-sq[propagate=original]",
    "rot+w4a8-g64-gptq[propagate=original]",
    "w4a4-g64-gptq[propagate=original]",
    "w4a4-g64-gptq-sq[propagate=original]",
    "rot+w4a4-g64-gptq[propagate=original]",
]


SETTINGS = ["w8", "w4-g32", "w4-g64", "w4-g128", "w3-g32", "w3-g64", "w3-g128", "w2-g32", "w2-g64"]


def _matrix(rows: dict, other: dict) -> list[str]:
    """RTN, GPTQ and AWQ side by side for every width and group (cells from the H100 table marked †)."""
    lines = ["| setting | RTN | GPTQ | AWQ | GPTQ and AWQ beat RTN |", "|---|---:|---:|---:|---|"]
    for setting in SETTINGS:
        cells, ppl = [], {}
        for method in ("rtn", "gptq", "awq"):
            name = f"{setting}-{method}"
            row, mark = (rows[name], "") if name in rows else (other.get(name), " †")
            cells.append(f"{row['ppl']:.3f}{mark}" if row else "")
            if row:
                ppl[method] = row["ppl"]
        verdict = ""
        if len(ppl) == 3:
            verdict = "yes" if max(ppl["gptq"], ppl["awq"]) < ppl["rtn"] else "no"
        lines.append(f"| {setting} | {' | '.join(cells)} | {verdict} |")
    return lines


def write_markdown(rows: dict, baseline: float | None, results: Path = RESULTS) -> None:
    any_row = next(iter(rows.values()))
    p = any_row["eval_protocol"]
    full = p["windows"] == p.get("windows_available")
    lines = [
        f"# Weight quantization of `smollm2-135m` (benchmark protocol{', full test set' if full else ''})",
        "",
        f"Eval: WikiText-2 raw test, GPTQ rows, ctx {p['ctx']}, {'all' if full else 'first'} {p['windows']} windows "
        f"({p['tokens_scored']:,} tokens), float32 compute, measured on the model **reloaded from its .clm file**.",
        "Calibration (GPTQ, AWQ): 128 × 512-token windows from the shipped C4 train sample, seed 0. RTN uses none.",
        "GPTQ rows use act-order with static groups (the default) unless named `-noact`.",
        "`<recipe>@4.6`: the budget solver's mixed precision (2 to 8 bits per layer, chosen from measured",
        "sensitivity) at 4.6 bits per linear weight; sensitivity is each layer's RTN output error weighted by the",
        "loss gradient (diagonal Fisher), or unweighted where named `:output`.",
        "Bits/param count every byte of the file (embedding and norms stored as float16); linear bits count",
        "codes, scales and zero points of the quantized linears.",
        "",
        f"Uncompressed float32 reference under the same protocol: ppl {baseline:.4f}." if baseline else "",
        "",
        "| recipe | ppl | Δ vs fp32 | bits/param (file) | linear bits/param | bytes on disk | compress s "
        "| peak RSS MiB (compress / whole point) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for row in rows.values():
        delta = f"{100 * (row['ppl'] / baseline - 1):+.1f} %" if baseline else ""
        mark = ""
        note = row.get("note") or (
            f"compressed with the recipe of its row in `{Path(row['plan_from']).name}` (the same plan, not planned "
            "anew)"
            if row.get("plan_from")
            else None
        )
        if note:
            notes.append(note)
            mark = f" [{len(notes)}]"
        lines.append(
            f"| {row['point']}{mark} | {row['ppl']:.3f} | {delta} | {row['bits_per_param']:.3f} "
            f"| {row['linear_bits_per_param']:.3f} | {row['bytes_on_disk']:,} | {row['compress_seconds']:.0f} "
            f"| {point_runner.rss_cell(row)} |"
        )
    lines += [""] + [f"[{i}] {note}" for i, note in enumerate(notes, start=1)]
    if full and RESULTS.with_suffix(".json").exists():
        first = json.loads(RESULTS.with_suffix(".json").read_text())
        same = [f"{name} {first[name]['ppl']:.3f} → {rows[name]['ppl']:.3f}" for name in rows if name in first]
        if same:
            lines += ["", "First 40 windows (`quant_table.md`) → the full set: " + "; ".join(same) + "."]
    h100 = HERE / "results" / "h100" / "quant_table.json"
    other = json.loads(h100.read_text()) if results == RESULTS and h100.exists() else {}
    if any(f"{s}-{m}" in rows or f"{s}-{m}" in other for s in SETTINGS for m in ("rtn", "gptq", "awq")):
        lines += ["", "## RTN, GPTQ and AWQ at every width and group", "", *_matrix(rows, other)]
    if any(f"{s}-{m}" not in rows and f"{s}-{m}" in other for s in SETTINGS for m in ("rtn", "gptq", "awq")):
        lines += ["", "† measured on an H100 with the same code and protocol (`results/h100/quant_table.md`; its RTN "
                  "rows match this table's to the third decimal), not yet on this machine."]  # fmt: skip
    original = [row for row in rows.values() if (row.get("calibration") or {}).get("propagate") == "original"]
    if original:
        reused = [row["point"] for row in original if row["calibration"].get("statistics_reused")]
        lines += [
            "",
            "`[propagate=original]`: every block calibrates on the uncompressed model's activations (one forward "
            "pass per block instead of two) and the statistics are cached on disk; rows that found them cached "
            f"ran no forward pass at all: {', '.join(reused) or 'none'}. All other rows are sequential (each block "
            "calibrates on the outputs of the blocks already compressed).",
        ]
    if any(name.startswith(("rot+", "w4a")) for name in rows):  # compare with w3-g64-gptq[propagate=original]
        lines += [
            "",
            "`rot+`: the residual stream rotated by a seeded random orthogonal matrix (64-point Hadamard ⊗ random 9×9, "
            "random signs) and each head's values by a 64-point Hadamard matrix, folded into the weights before "
            "calibration (QuaRot's fused rotations, without its online Hadamard rotations of the down projection's "
            "inputs and of the keys); the float model computes the same logits. The rotation unties the lm_head from "
            "the embedding, so those files hold a second float16 embedding-sized matrix. `w4a8`/`w4a4`: every "
            "quantized linear's input rounded per token to 8/4 bits (symmetric, dynamic), simulated in float32. "
            "`-sq`: SmoothQuant's scales (α = 0.5) folded first.",
        ]
    lines += [
        "",
        "Asymmetric grids with integer zero points unless named `-sym`; group sizes along the input dimension.",
        "The reference model ships as a Q4_1 GGUF (4-bit, group 32): its weights already sit on a group-32 grid, so "
        "g32 rows (and, less so, g64 rows, whose groups hold two of those) are flattered by that origin.",
    ]
    lines += point_runner.footer(rows, point_runner.command_line("benchmarks/quant_table.py"))
    atomic_write(results.with_suffix(".md"), "\n".join(line for line in lines) + "\n")


if __name__ == "__main__":
    point_runner.main(__file__, RESULTS, DEFAULT_POINTS, write_markdown)
