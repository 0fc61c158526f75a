"""GPTQ before and after its speed-up, side by side in one run: time per layer and per block, and quality.

The "before" implementation is `quant/gptq.py` as it stood at `--ref` (a git commit), loaded from the
repository's history into this process; the "after" is the working tree's. Both run on the same
inputs in the same process, one after the other.

1. Layers of a Llama-2-7B block (q/k/v/o 4096x4096, gate/up 11008x4096, down 4096x11008), random
   weights, Hessians from 8192 random inputs with uneven feature scales. A block's GPTQ time adds
   its seven layers; the "after" code factors a Hessian shared by q, k and v (and by gate and up) once.
2. The reference model (SmolLM2-135M) compressed W4 g128 GPTQ under the benchmark protocol
   (calibration 128 x 512 C4 windows; WikiText-2 test, ctx 2048, first 40 windows): compression
   time and the container's perplexity, before and after.

    .venv/bin/python benchmarks/gptq_speed.py --ref 352a0de
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from results_store import atomic_write

RESULTS = Path(__file__).resolve().parent / "results" / "gptq_speed.json"
LAYERS = {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096), "gate": (11008, 4096),
          "up": (11008, 4096), "down": (4096, 11008)}  # fmt: skip
SHARED = {"k": "q", "v": "q", "up": "gate"}  # layers reading the same input as another


def old_module(ref: str):
    """`compresslm.quant.gptq` as it was at `ref`, imported under another name."""
    source = subprocess.run(["git", "show", f"{ref}:src/compresslm/quant/gptq.py"], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).resolve().parent).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "gptq_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("gptq_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gptq_before"] = module
    spec.loader.exec_module(module)
    return module


def layer_times(before, after) -> dict:
    from compresslm.quant.grid import Grid

    grid = Grid(bits=4, group_size=128)
    generator = torch.Generator().manual_seed(0)
    hessians: dict[str, torch.Tensor] = {}
    rows = {}
    for name, (out_f, in_f) in LAYERS.items():
        if name not in SHARED:
            x = torch.randn(8192, in_f, generator=generator) * torch.rand(in_f, generator=generator)
            hessians[name] = 2 / 8192 * x.T @ x
        h = hessians[SHARED.get(name, name)]
        w = torch.randn(out_f, in_f, generator=generator) / in_f**0.5
        started = time.perf_counter()
        old = before.gptq(w, h, grid)
        t_before = time.perf_counter() - started
        started = time.perf_counter()
        new = after.gptq(w, h, grid)
        t_after = time.perf_counter() - started
        total = before.output_error(w, torch.zeros_like(w), h)
        rows[name] = {"shape": [out_f, in_f], "before_s": t_before, "after_s": t_after,
                      "relative_error_before": before.output_error(w, old.dequantize(), h) / total,
                      "relative_error_after": before.output_error(w, new.dequantize(), h) / total}  # fmt: skip
        print(f"{name}: {t_before:.1f} s -> {t_after:.1f} s", file=sys.stderr)
    return rows


def reference_model(before) -> dict:
    from compresslm.api import compress
    from compresslm.engine import linear_stages
    from compresslm.eval.perplexity import perplexity
    from compresslm.models.loading import load_model
    from compresslm.recipe import load_recipe

    current = linear_stages.gptq
    rows = {}
    for label, implementation in (("before", before.gptq), ("after", current)):
        linear_stages.gptq = implementation
        recipe = load_recipe("w4-g128-gptq")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.clm"
            _, result, summary = compress("smollm2-135m", recipe, path, show_progress=False)
            linear_stages.gptq = current
            ppl = perplexity(load_model(path), "wikitext2", ctx=2048, limit=40, show_progress=False)
        rows[label] = {"compress_seconds": result.seconds, "gptq_seconds": sum(x.seconds for x in result.layers),
                       "ppl": ppl.ppl, "linear_bits_per_param": summary["linear_bits_per_param"]}  # fmt: skip
        print(f"{label}: {rows[label]}", file=sys.stderr)
    return rows


def write_table(results: dict) -> str:
    layers = results["layers"]
    before = sum(r["before_s"] for r in layers.values())
    after = sum(r["after_s"] for r in layers.values())
    lines = [
        "# GPTQ before and after (side by side in one run)",
        "",
        f"Before: `src/compresslm/quant/gptq.py` at {results['ref']}; after: {results['after']}. "
        f"Machine: {results['machine']}; torch threads {results['threads']}; run alone.",
        "",
        "## Layers of a Llama-2-7B block (random weights, Hessians of 8192 random inputs), W4 g128",
        "",
        "| layer | shape | before | after | speed-up | relative error before | after |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in layers.items():
        shared = f" (Hessian of {SHARED[name]})" if name in SHARED else ""
        lines.append(f"| {name}{shared} | {r['shape'][0]}x{r['shape'][1]} | {r['before_s']:.1f} s | "
                     f"{r['after_s']:.1f} s | {r['before_s'] / r['after_s']:.2f}x | {r['relative_error_before']:.5f} | "
                     f"{r['relative_error_after']:.5f} |")  # fmt: skip
    lines.append(f"| **block** | | **{before:.1f} s** | **{after:.1f} s** | **{before / after:.2f}x** | | |")
    ref = results.get("reference")
    if ref:
        b, a = ref["before"], ref["after"]
        lines += ["", "## SmolLM2-135M, W4 g128 GPTQ, benchmark protocol (calibration 128 x 512 C4; WikiText-2 "
                  "test, ctx 2048, first 40 windows)", "",
                  "| | compression (whole run) | per-layer work, summed (GPTQ and the error report) | container ppl |",
                  "|---|---:|---:|---:|",
                  f"| before | {b['compress_seconds']:.0f} s | {b['gptq_seconds']:.0f} s | {b['ppl']:.4f} |",
                  f"| after | {a['compress_seconds']:.0f} s | {a['gptq_seconds']:.0f} s | {a['ppl']:.4f} |",
                  "", f"Perplexity change: {100 * (a['ppl'] / b['ppl'] - 1):+.3f} %; per-layer work "
                  f"{b['gptq_seconds'] / a['gptq_seconds']:.2f}x, whole compression "
                  f"{b['compress_seconds'] / a['compress_seconds']:.2f}x (calibration forward passes and "
                  "statistics are unchanged)."]  # fmt: skip
    lines += ["", f"Command: `.venv/bin/python benchmarks/gptq_speed.py --ref {results['ref']}`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", required=True, help="git commit holding the implementation to compare against")
    parser.add_argument("--skip-reference", action="store_true", help="only the 7B layer timings")
    args = parser.parse_args()
    before = old_module(args.ref)
    from compresslm.quant import gptq as after

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent).stdout.strip()  # fmt: skip
    results = {"ref": args.ref, "after": f"working tree at {head}", "machine": platform.platform(),
               "threads": torch.get_num_threads(), "layers": layer_times(before, after)}  # fmt: skip
    if not args.skip_reference:
        results["reference"] = reference_model(before)
    atomic_write(RESULTS, json.dumps(results, indent=1))
    atomic_write(RESULTS.with_suffix(".md"), write_table(results))


if __name__ == "__main__":
    main()
