"""One machine, split two ways: the default sweep on one vs two Ray workers, and GPTQ calibration in one
vs two processes.

Cases, each a `compresslm` command timed as a whole (wall time; peak RSS: the largest resident set of
any one process the case started, from the kernel's rusage of waited-for children):

* `sweep ray, 1 worker x 2 CPUs`: the `default` grid (what `make demo` runs) on a local Ray cluster of
  2 CPUs, each point declaring 2 CPUs (two torch threads), so one point runs at a time;
* `sweep ray, 2 workers x 1 CPU`: the same grid, each point declaring 1 CPU (one torch thread), so two
  points run at once;
* `compress, 1 process`: `w4-g64-gptq` of the reference model, 32 x 512 C4 windows, both cores;
* `compress, --nproc 2`: the same split over two gloo processes of one thread each.

Both sweeps must find the same perplexities (the table shows the largest difference between them).
Resumable: each finished case is saved before the next starts; a rerun skips saved cases (`--redo`
names cases to measure again). Run it with nothing else on the machine.

    .venv/bin/python benchmarks/distributed.py [--cases NAME ...] [--report]
"""

from __future__ import annotations

import argparse
import json
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from point_runner import command_line
from results_store import add_row, atomic_write, load_rows

from compresslm.sweep.grid import BUILTIN

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "distributed.json"
CLI = [sys.executable, "-m", "compresslm.cli"]
MODEL = "smollm2-135m"
CALIB = ["--calib-samples", "32", "--calib-len", "512"]
SWEEPS = ("sweep ray, 1 worker x 2 CPUs", "sweep ray, 2 workers x 1 CPU")


def _cases(work: Path) -> dict[str, list[str]]:
    sweep = ["sweep", MODEL, "--grid", "default", "--quiet", "--executor", "ray"]
    gptq = ["compress", MODEL, "--recipe", "w4-g64-gptq", *CALIB, "--quiet"]
    return {
        SWEEPS[0]: [*sweep, "--cpus-per-point", "2", "--db", str(work / "one.sqlite"), "--out", str(work / "r1")],
        SWEEPS[1]: [*sweep, "--cpus-per-point", "1", "--db", str(work / "two.sqlite"), "--out", str(work / "r2")],
        "compress, 1 process": [*gptq, "-o", str(work / "one.clm")],
        "compress, --nproc 2": [*gptq, "--nproc", "2", "-o", str(work / "two.clm")],
    }


def run_case(command: list[str]) -> dict:
    """Wall time and peak child RSS of one command, in a fresh interpreter so the children are its own."""
    probe = (
        "import resource, subprocess, sys, time, json\n"
        "t = time.perf_counter()\n"
        "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
        "print(json.dumps({'exit': code, 'wall_s': time.perf_counter() - t,"
        " 'peak_rss_bytes': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, *CLI, *command], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _sweep_points(db: Path) -> dict[str, dict]:
    """Each finished point's perplexity and its own seconds, read from the sweep's results store."""
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT label, result FROM points WHERE status='done'").fetchall()
    return {label: {k: json.loads(result).get(k) for k in ("ppl", "point_seconds")} for label, result in rows}


def measure(names: list[str], redo: list[str]) -> None:
    done = load_rows(RESULTS).get("rows", {})
    with tempfile.TemporaryDirectory(prefix="compresslm-distributed-") as tmp:
        for name, command in _cases(Path(tmp)).items():
            if name not in names or (name in done and name not in redo):
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {name}", file=sys.stderr, flush=True)
            row = {**run_case(command), "command": ["compresslm", *command[:-2]], "date": time.strftime("%Y-%m-%d")}
            if name in SWEEPS:
                row["points"] = _sweep_points(Path(command[command.index("--db") + 1]))
            done = add_row(RESULTS, "rows", {**done, name: row})["rows"]
            print(f"  {row['wall_s']:.0f} s, peak {row['peak_rss_bytes'] / 2**20:.0f} MiB", file=sys.stderr)
    add_row(RESULTS, "machine", {"platform": platform.platform(), "processor": _cpu(), "cpus": 2})
    add_row(RESULTS, "command", command_line("benchmarks/distributed.py"))


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def report() -> None:
    payload = load_rows(RESULTS)
    rows = payload.get("rows", {})
    grid = BUILTIN["default"]
    ppl, calib = grid["protocol"]["ppl"], grid["calibration"]
    lines = [
        "# One machine, split two ways (2 CPU cores)",
        "",
        f"Sweep: the `default` grid (what `make demo` runs: {len(grid['points'])} points, WikiText-2 ctx "
        f"{ppl['ctx']} first {ppl['limit']} windows, KL;",
        f"{calib['samples']} x {calib['length']} C4 calibration windows) on a local Ray cluster of 2 CPUs, with "
        "one point at a time on both",
        "cores, and with two points at once on one core each. Compress: W4 g64 GPTQ of SmolLM2-135M on",
        "32 x 512 C4 windows in one process (both cores) and split over two gloo processes of one thread each.",
        "Peak RSS: the largest resident set of any one process of the case (for a sweep, the largest Ray",
        "worker or the driver).",
        "",
        "| case | exit | wall time | peak RSS MiB (per process) |",
        "|---|---:|---:|---:|",
        *(
            f"| {name} | {r['exit']} | {r['wall_s']:.0f} s | {r['peak_rss_bytes'] / 2**20:.0f} |"
            for name, r in rows.items()
        ),
    ]
    if all(name in rows for name in SWEEPS):
        one, two = (rows[name]["points"] for name in SWEEPS)
        same = sorted(set(one) & set(two))
        gap = max((abs(one[k]["ppl"] - two[k]["ppl"]) / one[k]["ppl"] for k in same), default=float("nan"))
        lines += [
            "",
            f"Both sweeps finished {len(one)} and {len(two)} points; across the {len(same)} they share, the largest",
            f"relative perplexity difference is {gap:.2e}. One and two torch threads sum in different orders; "
            "where a method makes discrete choices",
            "from those sums (which weights SparseGPT's 2:4 mask drops, GPTQ's rounding), the small differences "
            "can flip choices",
            "and compound block by block, most on the most damaged points.",
            "",
            "| point | ppl (1 worker) | s (1 worker) | ppl (2 workers) | s (2 workers) |",
            "|---|---:|---:|---:|---:|",
            *(
                f"| {k} | {one[k]['ppl']:.3f} | {one[k]['point_seconds']:.0f} | {two[k]['ppl']:.3f} | "
                f"{two[k]['point_seconds']:.0f} |"
                for k in same
            ),
        ]
    machine = payload.get("machine", {})
    lines += [
        "",
        f"Command: `{payload.get('command', '')}`. Machine: {machine.get('processor', '?')}, "
        f"{machine.get('platform', '?')}, 2 CPUs, nothing else running. Dates: "
        + ", ".join(sorted({r.get("date", "?") for r in rows.values()}))
        + ".",
    ]
    atomic_write(RESULTS.with_suffix(".md"), "\n".join(lines) + "\n")


def main() -> None:
    names = list(_cases(Path("/nonexistent")))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=names, default=names)
    parser.add_argument("--redo", nargs="*", choices=names, default=[])
    parser.add_argument("--report", action="store_true", help="only rewrite the markdown table")
    args = parser.parse_args()
    if not args.report:
        measure(args.cases, args.redo)
    report()


if __name__ == "__main__":
    main()
