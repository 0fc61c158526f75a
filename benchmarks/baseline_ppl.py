"""Uncompressed perplexity of a model under the protocols we name apart.

Every later table compares against these numbers, so each is measured here under its full label:
WikiText-2 raw test, GPTQ row protocol (rows joined by "\\n\\n") or the file read as one string,
ctx 2048 (all 148 windows, and the first 40 of the benchmark protocol) and ctx 512 (first 40).

Resumable: each finished point is written to the JSON file before the next starts; rerunning the
same command skips points already there. Run:

    .venv/bin/python benchmarks/baseline_ppl.py [--model smollm2-135m] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

from results_store import add_row, atomic_write, load_rows

from compresslm.data.corpora import load_corpus
from compresslm.eval.perplexity import perplexity
from compresslm.models.loading import load_model

HERE = Path(__file__).parent
POINTS = {
    # name: (join, ctx, limit)
    "gptq-rows ctx2048 all": ("gptq-rows", 2048, None),
    "gptq-rows ctx2048 first40": ("gptq-rows", 2048, 40),
    "gptq-rows ctx512 first40": ("gptq-rows", 512, 40),
    "raw ctx2048 all": ("raw", 2048, None),
    "raw ctx512 first40": ("raw", 512, 40),
}


def _markdown(results: dict, model: str) -> str:
    lines = [
        f"# Uncompressed perplexity of `{model}` (float32, CPU)",
        "",
        "WikiText-2 raw **test**, token-level perplexity, no BOS, non-overlapping windows, remainder dropped.",
        "`gptq-rows`: the file's lines as rows (blank lines empty) joined by `\\n\\n` (GPTQ/SparseGPT code);",
        "`raw`: the file read as one string. Produced by `benchmarks/baseline_ppl.py`.",
        "",
        "| protocol | ctx | windows | tokens scored | text sha256 | ppl | wall time (s) |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for row in results.values():
        p = row["protocol"]
        lines.append(
            f"| {p['join']} | {p['ctx']} | {p['windows']}/{p['windows_available']} | {p['tokens_scored']:,} "
            f"| `{p['text_sha256'][:12]}` | {row['ppl']:.4f} | {p['wall_time_s']:.0f} |"
        )
    first = next(iter(results.values()))["protocol"]
    v = first["versions"]
    lines += [
        "",
        f"Machine: {platform.processor() or v['machine']}, {os.cpu_count()} CPUs, torch threads "
        f"{first['torch_threads']}; {v['platform']}.",
        f"Versions: compresslm {v['compresslm']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"python {v['python']}. Model sha256 `{first['model']['sha256'][:16]}…`.",
        "Wall times include other work sharing the machine's two cores; they are not a speed benchmark.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--only", nargs="*", default=None, help="point names to run (default: all)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "baseline_ppl")
    args = parser.parse_args()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path = args.out.with_suffix(".json")
    results = load_rows(json_path)
    lm = load_model(args.model)
    for name, (join, ctx, limit) in POINTS.items():
        if (args.only is not None and name not in args.only) or name in results:
            continue
        result = perplexity(lm, load_corpus("wikitext2", "test", join=join), ctx=ctx, limit=limit)
        row = {"ppl": result.ppl, "nll": result.nll, "tokens": result.tokens, "protocol": result.protocol}
        results = add_row(json_path, name, row)
        print(f"{name}: ppl {result.ppl:.4f}", flush=True)
    ordered = {k: results[k] for k in POINTS if k in results}
    atomic_write(args.out.with_suffix(".md"), _markdown(ordered, args.model))


if __name__ == "__main__":
    main()
