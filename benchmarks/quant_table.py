"""Weight quantization on the reference model under the benchmark protocol of DESIGN.md.

Calibration: 128 windows of 512 tokens from the shipped C4 sample, seed 0. Evaluation: WikiText-2
raw test, GPTQ row protocol, ctx 2048, first 40 windows (81,880 predicted tokens). Each point is
compressed, written as a .clm container, reloaded from that file and evaluated, in its own
subprocess so that its peak RSS is its own. Each finished point is saved before the next starts;
rerunning skips finished points.

    .venv/bin/python benchmarks/quant_table.py [--points w4-g64-gptq ...] [--limit 40]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_store import atomic_write, load_rows, save_rows

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
]
# Child processes wait passively at OpenMP barriers: with two cores, a spinning pool slows down
# several-fold whenever any other process runs; passive waiting costs
# ~10-25 % when alone (a one-off measurement). Recorded in each row.
CHILD_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def run_point(name: str, model: str, limit: int, workdir: Path) -> dict:
    """Compress, save, reload from disk, evaluate. Runs inside the point's own process."""
    from compresslm.api import compress
    from compresslm.eval.perplexity import perplexity
    from compresslm.models.loading import load_model

    lm = load_model(model)
    container = workdir / f"{name}.clm"
    started = time.perf_counter()
    _, result, summary = compress(lm, name, container, show_progress=False)
    seconds = time.perf_counter() - started
    reloaded = load_model(container)
    ppl = perplexity(reloaded, "wikitext2", ctx=2048, limit=limit, show_progress=False)
    errors = [layer.relative_error for layer in result.layers if layer.relative_error is not None]
    return {
        "point": name,
        "ppl": ppl.ppl,
        "bits_per_param": summary["bits_per_param"],
        "linear_bits_per_param": summary["linear_bits_per_param"],
        "bytes_on_disk": summary["bytes_on_disk"],
        "compress_seconds": result.seconds,
        "compress_and_save_seconds": seconds,
        "mean_layer_relative_error": sum(errors) / len(errors) if errors else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "recipe": result.recipe.to_dict(),
        "calibration": result.calibration,
        "eval_protocol": ppl.protocol,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
    }


def write_markdown(rows: dict, baseline: float | None) -> None:
    any_row = next(iter(rows.values()))
    p = any_row["eval_protocol"]
    v = p["versions"]
    lines = [
        "# Weight quantization of `smollm2-135m` (benchmark protocol)",
        "",
        f"Eval: WikiText-2 raw test, GPTQ rows, ctx {p['ctx']}, first {p['windows']} windows "
        f"({p['tokens_scored']:,} tokens), float32 compute, measured on the model **reloaded from its .clm file**.",
        "Calibration (GPTQ, AWQ): 128 × 512-token windows from the shipped C4 train sample, seed 0. RTN uses none.",
        "GPTQ rows use act-order with static groups (the default) unless named `-noact`.",
        "Bits/param count every byte of the file (embedding and norms stored as float16); linear bits count",
        "codes, scales and zero points of the quantized linears.",
        "",
        f"Uncompressed float32 reference under the same protocol: ppl {baseline:.4f}." if baseline else "",
        "",
        "| recipe | ppl | Δ vs fp32 | bits/param (file) | linear bits/param | bytes on disk | compress s "
        "| peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for row in rows.values():
        delta = f"{100 * (row['ppl'] / baseline - 1):+.1f} %" if baseline else ""
        mark = ""
        if row.get("note"):
            notes.append(row["note"])
            mark = f" [{len(notes)}]"
        lines.append(
            f"| {row['point']}{mark} | {row['ppl']:.3f} | {delta} | {row['bits_per_param']:.3f} "
            f"| {row['linear_bits_per_param']:.3f} | {row['bytes_on_disk']:,} | {row['compress_seconds']:.0f} "
            f"| {row['peak_rss_bytes'] / 2**20:.0f} |"
        )
    lines += [""] + [f"[{i}] {note}" for i, note in enumerate(notes, start=1)]
    lines += [
        "",
        "Command: `.venv/bin/python benchmarks/quant_table.py`. Asymmetric grids with integer zero points; "
        "group sizes along the input dimension. Timings were taken on a shared 2-core machine and are "
        "indicative only; compare them within one run.",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs; {v['platform']}. Versions: compresslm "
        f"{v['compresslm']}, torch {v['torch']}, transformers {v['transformers']}, python {v['python']}.",
    ]
    atomic_write(RESULTS.with_suffix(".md"), "\n".join(line for line in lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--points", nargs="*", default=DEFAULT_POINTS)
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one point, print its JSON row
    args = parser.parse_args()

    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(run_point(args.one, args.model, args.limit, Path(tmp))))
        return

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS.with_suffix(".json")
    rows = load_rows(json_path)
    for name in args.points:
        if name in rows:
            continue
        print(f"[{name}] running", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--one", name, "--model", args.model, "--limit", str(args.limit)]
        env = {**os.environ, **{k: os.environ.get(k, v) for k, v in CHILD_ENV.items()}}
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"point {name} failed")
        rows[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        save_rows(json_path, rows)
        print(f"[{name}] ppl {rows[name]['ppl']:.3f}", file=sys.stderr, flush=True)
    baseline_file = HERE / "results" / "baseline_ppl.json"
    baseline = None
    if baseline_file.exists():
        base = json.loads(baseline_file.read_text()).get("gptq-rows ctx2048 first40")
        baseline = base["ppl"] if base and args.limit == 40 else None
    ordered = {name: rows[name] for name in [*args.points, *rows] if name in rows}
    write_markdown(ordered, baseline)


if __name__ == "__main__":
    main()
