"""Run benchmark points (compress -> write .clm -> reload from the file -> perplexity), resumably.

Shared by quant_table.py and prune_table.py. Each point runs in its own subprocess, so its peak
RSS is its own; each finished point is saved (atomically) before the next starts, and a rerun
skips the points already recorded. Child processes wait passively at OpenMP barriers: on two
cores a spinning pool slows down several-fold whenever another process runs, and passive waiting
costs ~10-25 % when alone (a one-off measurement). The policy is recorded in every row.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from results_store import add_row, load_rows

CHILD_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def use_device(device: str) -> dict:
    """Prepare `device` for float32 benchmarks (TF32 off on CUDA) and describe it for the row."""
    import torch

    if not device.startswith("cuda"):
        return {"device": "cpu", "cpus": os.cpu_count()}
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32: no TF32 matmuls or convolutions
    torch.backends.cudnn.allow_tf32 = False
    torch.cuda.reset_peak_memory_stats()
    return {"device": torch.cuda.get_device_name(), "float32_matmul": "ieee (TF32 off)", "cpus": os.cpu_count()}


def gpu_peak() -> dict:
    import torch

    return {"peak_gpu_bytes": torch.cuda.max_memory_allocated()} if torch.cuda.is_available() else {}


def run_point(name: str, model: str, limit: int, workdir: Path, device: str = "cpu", plans: Path | None = None) -> dict:
    """Compress with preset `name`, save, reload from disk, evaluate. Runs inside the point's own process.

    `name` is a preset, `<preset>@4.6[:output]` (the budget solver at 4.6 bits per linear weight) or
    `<preset>[propagate=original]` (every block calibrates on the uncompressed model; the statistics
    are cached and shared by every such point on the same model). With `plans` (a table's JSON), a
    budget point takes the recipe its row there was compressed with instead of planning anew, so
    the same model is measured under another protocol (the full test set, say).
    """
    from compresslm.api import compress
    from compresslm.engine.stats_cache import default_cache_dir
    from compresslm.eval.perplexity import perplexity
    from compresslm.models.loading import load_model

    where = use_device(device)
    lm = load_model(model, device=device)
    if name == "none":  # the uncompressed model under the same protocol, on the same device
        from compresslm.sweep.runner import uncompressed_size

        ppl = perplexity(lm, "wikitext2", ctx=2048, limit=limit, show_progress=False)
        return {"point": name, "ppl": ppl.ppl, **uncompressed_size(lm), "compress_seconds": 0.0,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "eval_protocol": ppl.protocol, **where, **gpu_peak()}  # fmt: skip
    safe = name.replace("%", "pct").replace(":", "of").replace("@", "at").replace("[", "_").replace("]", "")
    container = workdir / f"{safe.replace('=', '-')}.clm"
    started = time.perf_counter()
    recipe, _, override = name.partition("[propagate=")
    recipe, _, budget = recipe.partition("@")
    planned = json.loads(plans.read_text()).get(name) if budget and plans else None
    if budget and plans and not planned:  # asked for the same plan: never plan anew in silence
        raise SystemExit(f"{plans} has no row '{name}' to take its plan from")
    if planned:
        from compresslm.recipe import load_recipe

        recipe, budget = load_recipe(planned["recipe"]), ""
    target = None
    if budget:
        from compresslm.engine.budget import BudgetTarget

        linear_bits, _, sensitivity = budget.partition(":")
        target = BudgetTarget(linear_bits=float(linear_bits), sensitivity=sensitivity or "fisher")
    if override:
        from compresslm.recipe import load_recipe

        recipe = load_recipe(recipe)
        recipe.calibration.propagate = override.removesuffix("]")
        recipe.validate()
    _, result, summary = compress(
        lm, recipe, container, show_progress=False, stats_cache=default_cache_dir(), target=target
    )
    seconds = time.perf_counter() - started
    compress_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del lm  # the evaluation runs on the reloaded container alone
    reloaded = load_model(container, device=device)
    ppl = perplexity(reloaded, "wikitext2", ctx=2048, limit=limit, show_progress=False)
    errors = [layer.relative_error for layer in result.layers if layer.relative_error is not None]
    return {
        "point": name,
        "ppl": ppl.ppl,
        "bits_per_param": summary["bits_per_param"],
        "linear_bits_per_param": summary["linear_bits_per_param"],
        "linear_sparsity": summary.get("linear_sparsity", 0.0),
        "bytes_on_disk": summary["bytes_on_disk"],
        "compress_seconds": result.seconds,
        "compress_and_save_seconds": seconds,
        "mean_layer_relative_error": sum(errors) / len(errors) if errors else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "compress_peak_rss_bytes": compress_peak,  # load + compress + write, before the evaluation
        "recipe": result.recipe.to_dict(),
        "calibration": result.calibration,
        "compression_info": {k: v for k, v in result.info.items() if k != "model"},
        "eval_protocol": ppl.protocol,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        **({"plan_from": str(plans)} if planned else {}),
        **where,
        **gpu_peak(),
    }


def run_queue(script: str, json_path: Path, names: list[str], child_args: list[str]) -> dict:
    """Run every point of `names` not yet in `json_path`, each as `script --one NAME *child_args`.

    A point's row is the last line its process prints (JSON); it is saved before the next starts.
    """
    json_path.parent.mkdir(parents=True, exist_ok=True)
    rows = load_rows(json_path)
    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in CHILD_ENV.items()}}
    for name in names:
        if name in rows:
            continue
        print(f"[{name}] running", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, script, "--one", name, *child_args], stdout=subprocess.PIPE,
                              text=True, check=False, env=env)  # fmt: skip
        if proc.returncode != 0:
            raise SystemExit(f"point {name} failed (its error is above)")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row.setdefault("omp_wait_policy", env.get("OMP_WAIT_POLICY", "default"))
        if "MALLOC_MMAP_THRESHOLD_" in env:  # glibc: tensors above it are mmapped (less heap fragmentation)
            row.setdefault("malloc_mmap_threshold", int(env["MALLOC_MMAP_THRESHOLD_"]))
        row.setdefault("command", command_line(f"benchmarks/{Path(script).name}"))
        rows = add_row(json_path, name, row)
        ppl = f" ppl {rows[name]['ppl']:.3f}" if "ppl" in rows[name] else ""
        print(f"[{name}] done{ppl}", file=sys.stderr, flush=True)
    return rows


def baseline_ppl(here: Path, limit: int) -> float | None:
    """The float32 reference under the same protocol, from baseline_ppl.py's output."""
    path = here / "results" / "baseline_ppl.json"
    if not path.exists() or limit != 40:
        return None
    base = json.loads(path.read_text()).get("gptq-rows ctx2048 first40")
    return base["ppl"] if base else None


def main(script: str, results: Path, default_points: list[str], write_markdown: Callable[[dict, float | None], None]):
    """The command line of a table script: run the missing points, then rewrite its markdown."""
    parser = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--points", nargs="*", default=default_points)
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--results", type=Path, default=results, help="the table's JSON/markdown path, no suffix")
    parser.add_argument("--plans-from", type=Path, help="a table's JSON: budget points reuse its rows' recipes")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one point, print its JSON row
    parser.add_argument("--report", action="store_true", help="only rewrite the markdown from the JSON (run nothing)")
    args = parser.parse_args()
    if args.plans_from and not args.plans_from.is_file():
        parser.error(f"--plans-from {args.plans_from}: no such file")

    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            row = run_point(args.one, args.model, args.limit, Path(tmp), args.device, args.plans_from)
            print(json.dumps(row))
        return

    child = ["--model", args.model, "--limit", str(args.limit), "--device", args.device]
    child += ["--plans-from", str(args.plans_from)] if args.plans_from else []
    json_path = args.results.with_suffix(".json")
    rows = load_rows(json_path) if args.report else run_queue(script, json_path, args.points, child)
    ordered = {name: rows[name] for name in [*default_points, *args.points, *rows] if name in rows}
    if ordered:
        # the float32 reference of another machine is not this table's: without a 'none' row, no Δ column
        cpu_baseline = baseline_ppl(Path(script).parent, args.limit) if args.device == "cpu" else None
        baseline = ordered.pop("none")["ppl"] if "none" in ordered else cpu_baseline
        write_markdown(ordered, baseline, args.results)


def table_main(
    script: str, results: Path, default_points: list[str], run_point: Callable, options: list[tuple[str, type, object]]
) -> tuple[dict, argparse.Namespace] | None:
    """The command line of a table script that measures its own kinds of point (not compress -> ppl).

    `options` are (flag, type, default), passed on to every child process; `run_point(name, args)`
    measures one point in the child (`--one`), which prints its row and gets None back. The parent
    returns the finished rows, default points first, and its arguments.
    """
    parser = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__.splitlines()[0])
    parser.add_argument("--points", nargs="*", default=default_points)
    for flag, kind, default in options:
        parser.add_argument(flag, type=kind, default=default)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one point, print its JSON row
    parser.add_argument("--report", action="store_true", help="only rewrite the markdown from the JSON (run nothing)")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_point(args.one, args)))
        return None
    child = [part for flag, _, _ in options for part in (flag, str(getattr(args, flag[2:].replace("-", "_"))))]
    json_path = Path(getattr(args, "results", None) or results).with_suffix(".json")
    rows = load_rows(json_path) if args.report else run_queue(script, json_path, args.points, child)
    return {name: rows[name] for name in [*default_points, *rows] if name in rows}, args


def rss_cell(row: dict) -> str:
    """'compress / whole point' peak RSS in MiB (rows from before the split show only the whole point)."""
    whole = f"{row['peak_rss_bytes'] / 2**20:.0f}"
    if "compress_peak_rss_bytes" not in row:
        return f"– / {whole}"
    return f"{row['compress_peak_rss_bytes'] / 2**20:.0f} / {whole}"


def command_line(script: str) -> str:
    """How this table was produced: the script and the arguments it was given (`--report`, which only
    rewrites the table, aside)."""
    return shlex.join([".venv/bin/python", script, *(arg for arg in sys.argv[1:] if arg != "--report")])


def commands(rows: dict, command: str) -> str:
    """The invocations that measured `rows`, in the order first used (`command`, this one, if no row
    records its own: rows from before rows recorded it)."""
    used = list(dict.fromkeys(row["command"] for row in rows.values() if "command" in row))
    if not used:
        return f"Command: `{command}`."
    older = sum("command" not in row for row in rows.values())
    text = "Commands, in the order first run: " + "; ".join(f"`{c}`" for c in used) + "."
    return text + (f" {older} older rows did not record theirs." if older else "")


def footer(rows: dict, command: str) -> list[str]:
    """Commands, machine, versions and how the OpenMP pool waited, for a table's markdown."""
    import platform

    command = commands(rows, command)
    first = next(iter(rows.values()))
    v = first["eval_protocol"]["versions"]
    if first.get("device", "cpu") != "cpu":
        return [
            "",
            f"{command} Measured on one {first['device']} ({first.get('cpus')} CPU cores beside it), "
            f"float32 with TF32 off, one process per point; the 'peak RSS' column is host memory.",
            f"Versions: compresslm {v['compresslm']}, torch {v['torch']}, transformers {v['transformers']}, "
            f"python {v['python']}; {v['platform']}.",
        ]
    passive = [name for name, row in rows.items() if row.get("omp_wait_policy") == "PASSIVE"]
    lines = [
        "",
        f"{command} Timings were taken on a shared 2-core machine and are indicative only; "
        "compare them within one run.",
    ]
    threads = sorted({row["eval_protocol"].get("torch_threads") for row in rows.values()} - {None})
    if len(threads) > 1:
        one = [name for name, row in rows.items() if row["eval_protocol"].get("torch_threads") == 1]
        lines.append(
            f"Points run with 1 torch thread (two benchmark queues side by side, one core each; their times are "
            f"not comparable with 2-thread rows): {', '.join(one)}."
        )
    if passive:
        lines.append(
            f"{len(passive)} of {len(rows)} points ran with OMP_WAIT_POLICY=PASSIVE (robust to other processes "
            "on the machine, ~10-25 % slower when alone): " + ", ".join(passive) + "."
        )
    lines.append(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs; {v['platform']}. Versions: compresslm "
        f"{v['compresslm']}, torch {v['torch']}, transformers {v['transformers']}, python {v['python']}."
    )
    return lines
