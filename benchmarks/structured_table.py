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
STEPS = ("shrink", "ppl", "speed", "heal", "ppl_healed", "tasks", "tasks_healed")


def _model(variant: str, healed: bool = False) -> str:
    if variant == "unpruned":
        return REFERENCE
    return str(WORK / f"{variant}-healed" / "model") if healed else str(WORK / variant)


def _command(step: str, variant: str, steps: int) -> list[str]:
    if step == "shrink":
        return ["shrink", REFERENCE, "--recipe", VARIANTS[variant], "-o", _model(variant)]
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
    jobs += [(step, v) for v in reversed(VARIANTS) for step in ("heal", "ppl_healed")]
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
        if step == "speed":  # rounds of every model once each, so that drift shows as spread
            models = [v for v in ("unpruned", *VARIANTS) if v == "unpruned" or f"shrink {v}" in rows]
            row = {"step": step, "models": {model: [] for model in models}}
            for _ in range(SPEED_ROUNDS):
                for model in models:
                    result = _step(key, _command("speed", model, args.steps))
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


def _speed(rows: dict, variant: str) -> dict | None:
    """Batch-1 tokens/s (median over the rounds of each round's median, and the rounds' range), model
    bytes and peak RSS of one model in the speed pass."""
    rounds = rows.get("speed rounds", {}).get("models", {}).get(variant)
    if not rounds:
        return None
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
    discarded = rows.get("speed all (discarded)")
    if discarded:
        lines += ["", f"A first speed pass is kept in the JSON as `speed all (discarded)`: {discarded['discarded']}."]
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
