"""Structured pruning of the reference model: MLP width, heads and depth cut, before and after healing.

Each variant is made by `compresslm shrink` (importance from 32 x 512-token windows of the shipped C4
sample, seed 0), saved as a plain Hugging Face directory, and measured as it is and after healing:
`compresslm train DIR --recipe heal --teacher smollm2-135m` (logit distillation from the unpruned
model, lr 1e-4, batch 4 x 256 tokens of C4 for `--steps` steps). Perplexity: benchmark protocol of
DESIGN.md (WikiText-2 raw test, GPTQ rows, ctx 2048, first 40 windows). Tasks: a seeded subset of
ARC-Easy and PIQA. Speed: eval.speed at batch 1 (prompt 128 random ids, 64 greedy steps, 1 warm-up +
3 timed runs) of every variant and the unpruned model, in `SPEED_ROUNDS` interleaved rounds (each
round measures every model once), so a machine whose speed drifts during the pass shows as spread
between rounds instead of as a ratio; run it with nothing else on the machine.

The `frontier` step is one `compresslm sweep` under the benchmark protocol (128 x 512 C4 calibration
windows) into results/structured_frontier/: the full model at W4/W3/W2 g64 GPTQ against the healed
~50 % student (`combined`) as it is and at W8/W4/W3 g64 GPTQ; the sweep's report says which wins at
each size. The sweep resumes point by point like any other.

Every step is one `compresslm` subprocess whose JSON is journalled in the results file as soon as it
finishes; a rerun skips finished steps (stop with Ctrl-C or `--budget` seconds; the step running at
the budget is finished first).

    .venv/bin/python benchmarks/structured_table.py run [--budget 540] [--only shrink,ppl] [--steps 60]
    .venv/bin/python benchmarks/structured_table.py report
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from results_store import add_row, atomic_write, load_rows

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "structured_table.json"
WORK = Path("/tmp/compresslm-structured")
CLI = [sys.executable, "-m", "compresslm.cli"]
REFERENCE = "smollm2-135m"
VARIANTS = {  # name -> shrink recipe
    "mlp25": "mlp25",
    "mlp50": "mlp50",
    "heads25": "heads25",
    "drop4": "drop4",
    "drop8": "drop8",
    "combined": "drop10+mlp50+heads25",
}
PPL = ["--ppl", "wikitext2", "--ctx", "2048", "--limit", "40"]
TASKS = ["--tasks", "arc_easy,piqa", "--task-limit", "200", "--data-dir", str(ROOT.parent / "shared" / "data")]
SPEED = ["--speed", "--speed-prompt", "128", "--speed-new", "64", "--repeats", "3"]
SPEED_ROUNDS = 3
STEPS = ("shrink", "ppl", "speed", "gguf", "gguf_export", "speed_llamacpp", "heal", "ppl_healed", "frontier", "tasks",
         "tasks_healed")  # fmt: skip
FRONTIER = HERE / "results" / "structured_frontier"
STUDENT = "combined"


def _frontier_grid() -> dict:
    student = _model(STUDENT, healed=True)
    return {
        "name": "structured-frontier",
        "description": "the full model at W4/W3/W2 against the healed ~50 % student, benchmark protocol",
        "protocol": {"ppl": {"corpus": "wikitext2", "ctx": 2048, "limit": 40}, "kld": True},
        "calibration": {"samples": 128, "length": 512},
        "points": [
            "none", "w4-g64-gptq", "w3-g64-gptq", "w2-g64-gptq",
            {"label": "student", "recipe": "none", "model": student},
            *({"label": f"student+{r}", "recipe": r, "model": student} for r in ("w8-g64-gptq", "w4-g64-gptq",
                                                                                 "w3-g64-gptq")),
        ],
    }  # fmt: skip


def _model(variant: str, healed: bool = False) -> str:
    if variant == "unpruned":
        return REFERENCE
    return str(WORK / f"{variant}-healed" / "model") if healed else str(WORK / variant)


def _command(step: str, variant: str, steps: int) -> list[str]:
    if step == "shrink":
        return ["shrink", REFERENCE, "--recipe", VARIANTS[variant], "-o", _model(variant)]
    if step == "frontier":
        grid = WORK / "frontier.json"
        atomic_write(grid, json.dumps(_frontier_grid(), indent=2))
        return ["sweep", REFERENCE, "--grid", str(grid), "--db", str(FRONTIER / "results.sqlite"),
                "--out", str(FRONTIER / "report"), "--containers", str(WORK / "frontier-containers")]  # fmt: skip
    if step == "gguf":  # llama.cpp's 8-bit type, lossless from its own grid: what runs there
        return ["compress", _model(variant), "--recipe", "gguf-q8_0-rtn", "-o", str(WORK / f"{variant}-q8.clm")]
    if step == "gguf_export":
        return ["export", str(WORK / f"{variant}-q8.clm"), "--format", "gguf", "--force",
                "-o", str(WORK / f"{variant}-q8.gguf")]  # fmt: skip
    if step == "speed_llamacpp":
        return ["eval", str(WORK / f"{variant}-q8.gguf"), "--backend", "llama.cpp", *SPEED]
    if step == "heal":
        return ["train", _model(variant), "--recipe", "heal", "--teacher", REFERENCE, "--steps", str(steps),
                "--batch-size", "4", "--seq-len", "256", "-o", str(WORK / f"{variant}-healed")]  # fmt: skip
    healed = step.endswith("_healed")
    extra = {"ppl": PPL, "tasks": TASKS, "speed": SPEED}[step.removesuffix("_healed")]
    return ["eval", _model(variant, healed), *extra]


def _jobs(only: set[str]) -> list[tuple[str, str]]:
    """(step, variant) in the order that gets the most important numbers first."""
    jobs = [("ppl", "unpruned")]
    jobs += [("shrink", v) for v in VARIANTS] + [("speed", "rounds")] + [("ppl", v) for v in VARIANTS]
    jobs += [(step, v) for step in ("gguf", "gguf_export") for v in ("unpruned", *VARIANTS)]
    jobs += [("speed_llamacpp", "rounds")]
    jobs += [(step, v) for v in reversed(VARIANTS) for step in ("heal", "ppl_healed")]
    jobs += [("frontier", STUDENT)]
    jobs += [("tasks", "unpruned")] + [(step, v) for v in VARIANTS for step in ("tasks", "tasks_healed")]
    return [(step, v) for step, v in jobs if not only or step.removesuffix("_healed") in only or step in only]


def run(args: argparse.Namespace) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    only = set(filter(None, args.only.split(",")))
    for step, variant in _jobs(only):
        key = f"{step} {variant}"
        rows = load_rows(RESULTS)
        if key in rows:
            continue
        if args.budget and time.monotonic() - started > args.budget:
            print(f"budget of {args.budget} s spent; rerun to go on", file=sys.stderr)
            return
        if step in ("speed", "speed_llamacpp"):  # rounds of every model once each, so that drift shows as spread
            ready = "shrink" if step == "speed" else "gguf_export"
            models = [
                v for v in ("unpruned", *VARIANTS) if f"{ready} {v}" in rows or (v, ready) == ("unpruned", "shrink")
            ]
            row = {"step": step, "models": {model: [] for model in models}}
            for _ in range(SPEED_ROUNDS):
                for model in models:
                    result = _step(key, _command(step, model, args.steps))
                    if result is None:
                        return
                    row["models"][model].append(result)
        else:
            row = _step(key, _command(step, variant, args.steps))
            if row is None:
                return
        add_row(RESULTS, key, {**row, "step": step, "variant": variant})
    write_markdown(load_rows(RESULTS))


def _step(key: str, command: list[str]) -> dict | None:
    """Run one compresslm command; its JSON (without per-window lists), wall time and command, or None."""
    print(f"[{time.strftime('%H:%M:%S')}] {key}: compresslm {' '.join(command)}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    proc = subprocess.run([*CLI, *command, "--json", "--quiet"], capture_output=True, text=True, cwd=ROOT)
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        print(f"  failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    print(f"  done in {seconds:.0f} s", file=sys.stderr, flush=True)
    out = {k: v for k, v in json.loads(proc.stdout).items() if k != "window_nll"}
    return {"seconds": round(seconds, 1), "command": ["compresslm", *command], "result": out}


def _ppl(rows: dict, step: str, variant: str) -> str:
    row = rows.get(f"{step} {variant}")
    return f"{row['result']['ppl']:,.2f}" if row else "–"


def _tasks(rows: dict, step: str, variant: str) -> str:
    row = rows.get(f"{step} {variant}")
    if not row:
        return "–"
    tasks = row["result"].get("tasks", {})
    return " / ".join(f"{100 * t['acc_norm']:.1f}" for t in tasks.values()) if tasks else "–"


def _params(rows: dict, variant: str) -> tuple[int | None, dict]:
    row = rows.get(f"shrink {variant}")
    if not row:
        return None, {}
    stages = row["result"]["stages"]
    facts = {k: s[k] for s in stages for k in ("layers", "mlp", "heads", "hidden") if k in s}
    return stages[-1]["parameters"]["to"], facts


def _speed(rows: dict, variant: str, step: str = "speed") -> dict | None:
    """Batch-1 tokens/s (median over the rounds of each round's median, and the rounds' range), model
    bytes and peak RSS of one model in the speed pass (`speed`: PyTorch; `speed_llamacpp`: llama.cpp)."""
    rounds = rows.get(f"{step} rounds", {}).get("models", {}).get(variant)
    if not rounds:
        return None
    if step == "speed_llamacpp":
        decode = sorted(r["result"]["speed"]["decode_tokens_per_s"]["median"] for r in rounds)
        prefill = sorted(r["result"]["speed"]["prefill_tokens_per_s"]["median"] for r in rounds)
        return {"prefill": prefill[len(prefill) // 2], "decode": decode[len(decode) // 2],
                "decode_range": (decode[0], decode[-1])}  # fmt: skip
    batches = [r["result"]["speed"]["per_batch"]["1"] for r in rounds]
    prefill = sorted(b["prefill_tokens_per_s"]["median"] for b in batches)
    decode = sorted(b["decode_tokens_per_s"]["median"] for b in batches)
    return {
        "prefill": prefill[len(prefill) // 2],
        "decode": decode[len(decode) // 2],
        "decode_range": (decode[0], decode[-1]),
        "model_mib": rounds[0]["result"]["speed"]["model_bytes_in_memory"] / 2**20,
        "peak_mib": max(r["result"]["peak_rss_bytes"] for r in rounds) / 2**20,
    }


def write_markdown(rows: dict) -> None:
    if not rows:
        return
    atomic_write(RESULTS, json.dumps(rows, indent=2) + "\n")
    base_params = None
    shrink = next((r for k, r in rows.items() if k.startswith("shrink ")), None)
    if shrink:
        base_params = shrink["result"]["stages"][0]["parameters"]["from"]
    heal = next((r for k, r in rows.items() if k.startswith("heal ")), None)
    heal_note = "not run yet"
    if heal:
        steps = int(heal["command"][heal["command"].index("--steps") + 1])
        heal_note = f"{steps} steps x 4 x 256 = {steps * 1024:,} tokens of C4"
    base_speed = _speed(rows, "unpruned")
    lines = [
        "# Structured pruning of `smollm2-135m`: smaller models, before and after healing",
        "",
        "Each variant removes the same structures in every block (an ordinary smaller config that plain transformers",
        "loads), chosen by calibration importance (32 x 512-token C4 windows, seed 0): MLP channels and heads by the",
        "output energy they add, blocks by how little they turn the residual stream. `heads25` asks for 25 % of the",
        "9 query heads; grouped-query attention (3 key/value groups) allows 6 of 9 (33 %). Perplexity: WikiText-2",
        "raw test, GPTQ rows, ctx 2048, first 40 windows (benchmark protocol), float32. Healing: logit distillation",
        f"from the unpruned model, lr 1e-4, {heal_note}. Tasks: accuracy on a seeded subset of 200 items each of",
        "ARC-Easy / PIQA, acc_norm (log-likelihood per character), in %.",
        "",
        "| variant | recipe | what is left | parameters | share removed | ppl | ppl healed | ARC-E / PIQA | healed |",
        "|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    lines.append(f"| unpruned | – | 30 layers, MLP 1536, 9 heads | {base_params or 0:,} | 0 % "
                 f"| {_ppl(rows, 'ppl', 'unpruned')} | – | {_tasks(rows, 'tasks', 'unpruned')} | – |")  # fmt: skip
    for variant, recipe in VARIANTS.items():
        params, facts = _params(rows, variant)
        left = ", ".join(f"{k} {v['to']}" for k, v in facts.items())
        share = f"{100 * (1 - params / base_params):.1f} %" if params and base_params else "–"
        shown = f"{params:,}" if params else "–"
        lines.append(f"| {variant} | `{recipe}` | {left or '–'} | {shown} | {share} | {_ppl(rows, 'ppl', variant)} "
                     f"| {_ppl(rows, 'ppl_healed', variant)} | {_tasks(rows, 'tasks', variant)} "
                     f"| {_tasks(rows, 'tasks_healed', variant)} |")  # fmt: skip
    lines += [
        "",
        f"## Speed and memory (PyTorch float32, batch 1, {SPEED_ROUNDS} interleaved rounds of every model)",
        "",
        "| variant | prefill tok/s | decode tok/s [rounds' range] | decode vs unpruned | model MiB in memory "
        "| peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for variant in ("unpruned", *VARIANTS):
        speed = _speed(rows, variant)
        if not speed:
            continue
        ratio = f"{speed['decode'] / base_speed['decode']:.2f}x" if base_speed else ""
        low, high = speed["decode_range"]
        cells = f"{speed['prefill']:.0f} | {speed['decode']:.1f} [{low:.1f}-{high:.1f}] | {ratio}"
        cells += f" | {speed['model_mib']:.0f}"
        cells += f" | {speed['peak_mib']:.0f}"
        lines.append(f"| {variant} | {cells} |")
    if rows.get("speed_llamacpp rounds"):
        base_cpp = _speed(rows, "unpruned", "speed_llamacpp")
        lines += [
            "",
            f"## Speed in llama.cpp (GGUF Q8_0 exports, batch 1, {SPEED_ROUNDS} interleaved rounds)",
            "",
            "Each model compressed with `gguf-q8_0-rtn` and exported with `compresslm export --format gguf`; the same",
            "workload as above through `compresslm eval FILE.gguf --backend llama.cpp --speed`.",
            "",
            "| variant | prefill tok/s | decode tok/s [rounds' range] | decode vs unpruned |",
            "|---|---:|---:|---:|",
        ]
        for variant in ("unpruned", *VARIANTS):
            speed = _speed(rows, variant, "speed_llamacpp")
            if speed:
                ratio = f"{speed['decode'] / base_cpp['decode']:.2f}x" if base_cpp else ""
                low, high = speed["decode_range"]
                lines.append(f"| {variant} | {speed['prefill']:.0f} | {speed['decode']:.1f} [{low:.1f}-{high:.1f}] "
                             f"| {ratio} |")  # fmt: skip
    lines += _frontier_lines(rows.get(f"frontier {STUDENT}"))
    discarded = rows.get("speed all (discarded)")
    if discarded:
        lines += ["", f"A first speed pass is kept in the JSON as `speed all (discarded)`: {discarded['discarded']}."]
    disturbed = [key for key in rows if key.endswith("(disturbed)")]
    if disturbed:
        names = ", ".join(f"`{key}`" for key in disturbed)
        note = "(a test run shared the machine); measured again alone."
        lines += ["", f"Also kept in the JSON and not shown: {names} {note}"]
    lines += [
        "",
        "'–': not measured yet (the script resumes where it stopped). Perplexity and task steps may have run beside",
        "other work on the machine (their wall times in the JSON are not comparisons); the speed pass must run alone.",
        "",
        "Each step is one `compresslm` command recorded in structured_table.json (`command`), with its wall time.",
        f"Machine: {platform.platform()}, 2 CPUs; Python {platform.python_version()}.",
        "Command: `.venv/bin/python benchmarks/structured_table.py run` (repeated until every step is done).",
    ]
    atomic_write(RESULTS.with_suffix(".md"), "\n".join(lines) + "\n")


def _frontier_lines(row: dict | None) -> list[str]:
    """The student against the full model at equal bytes: every point by size, the best so far marked."""
    if not row:
        return []
    points = sorted(row["result"]["points"], key=lambda r: r["bytes_on_disk"])
    lines = [
        "",
        f"## The healed ~50 % student (`{VARIANTS[STUDENT]}`) against the full model at equal size",
        "",
        "One `compresslm sweep` under the benchmark protocol (128 x 512 C4 calibration windows; KL to the unpruned",
        "model on the same windows); its report: [structured_frontier/report](structured_frontier/report/report.md).",
        "Best: the lowest perplexity at or below that size.",
        "",
        "| point | MB on disk | bits/param of the full model | ppl | KL | best at this size |",
        "|---|---:|---:|---:|---:|---|",
    ]
    full_params, best = None, None
    for point in points:
        if point["label"] == "none":
            full_params = point["bytes_on_disk"] * 8 / point["bits_per_param"]
    for point in points:
        best = point if best is None or point["ppl"] < best["ppl"] else best
        bits = f"{8 * point['bytes_on_disk'] / full_params:.2f}" if full_params else "–"
        lines.append(f"| {point['label']} | {point['bytes_on_disk'] / 1e6:.1f} | {bits} | {point['ppl']:,.2f} "
                     f"| {point.get('kld_mean', float('nan')):.3f} | {best['label']} |")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run")
    r.add_argument("--budget", type=float, default=0, help="seconds after which no new step starts (0: none)")
    r.add_argument("--only", default="", help="comma-separated steps to run: " + ", ".join(STEPS))
    r.add_argument("--steps", type=int, default=60, help="healing steps (4 x 256 tokens each)")
    sub.add_parser("report")
    args = parser.parse_args()
    if args.what == "run":
        run(args)
    else:
        write_markdown(load_rows(RESULTS))


if __name__ == "__main__":
    main()
