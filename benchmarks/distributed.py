"""One machine, split two ways: a sweep on one vs two Ray workers, and GPTQ calibration in one vs two processes.

Cases, each a `compresslm` command timed as a whole (wall time; peak RSS: the largest resident set
of any process the case started, from the kernel's rusage of waited-for children):

* `sweep local`: the `smoke` grid (3 points) with the local executor, torch on both cores;
* `sweep ray x2`: the same grid on a local Ray cluster of 2 CPUs, one CPU (and one torch thread) per
  point, so two points run at once;
* `compress 1 process`: `w4-g64-gptq` of the reference model, 32 x 512 C4 windows, both cores;
* `compress --nproc 2`: the same split over two gloo processes of one thread each.

Run it with nothing else on the machine; each case writes into a fresh temporary folder.

    .venv/bin/python benchmarks/distributed.py
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from point_runner import command_line
from results_store import atomic_write

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "distributed.json"
CLI = [sys.executable, "-m", "compresslm.cli"]
MODEL = "smollm2-135m"
CALIB = ["--calib-samples", "32", "--calib-len", "512"]


def _cases(work: Path) -> dict[str, list[str]]:
    sweep = ["sweep", MODEL, "--grid", "smoke", "--quiet"]
    nproc = ["compress", MODEL, "--recipe", "w4-g64-gptq", *CALIB, "--nproc", "2", "-o", str(work / "two.clm")]
    return {
        "sweep local": [*sweep, "--db", str(work / "local.sqlite"), "--out", str(work / "r1")],
        "sweep ray x2": [*sweep, "--db", str(work / "ray.sqlite"), "--out", str(work / "r2"), "--executor", "ray"],
        "compress 1 process": ["compress", MODEL, "--recipe", "w4-g64-gptq", *CALIB, "-o", str(work / "one.clm")],
        "compress --nproc 2": nproc,
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


def main() -> None:
    rows = {}
    with tempfile.TemporaryDirectory(prefix="compresslm-distributed-") as tmp:
        for name, command in _cases(Path(tmp)).items():
            print(f"[{time.strftime('%H:%M:%S')}] {name}", file=sys.stderr, flush=True)
            rows[name] = {**run_case(command), "command": ["compresslm", *command[:-2]]}
            print(f"  {rows[name]['wall_s']:.0f} s, peak {rows[name]['peak_rss_bytes'] / 2**20:.0f} MiB",
                  file=sys.stderr)  # fmt: skip
    payload = {"machine": {"platform": platform.platform(), "cpus": 2}, "rows": rows,
               "command": command_line("benchmarks/distributed.py")}  # fmt: skip
    atomic_write(RESULTS, json.dumps(payload, indent=2) + "\n")
    lines = [
        "# One machine, split two ways (2 CPU cores)",
        "",
        "Sweep: the `smoke` grid (3 points: float, W8 RTN, W4 g64 RTN; WikiText-2 ctx 512, 4 windows, KL) with the",
        "local executor (both cores, one point at a time) and on a local Ray cluster of 2 CPUs (one CPU and one torch",
        "thread per point, two points at once). Compress: W4 g64 GPTQ of SmolLM2-135M on 32 x 512 C4 windows in one",
        "process (both cores) and split over two gloo processes of one thread each. Peak RSS: the largest resident",
        "set of any one process of the case.",
        "",
        "| case | exit | wall time | peak RSS MiB (per process) |",
        "|---|---:|---:|---:|",
        *(
            f"| {name} | {r['exit']} | {r['wall_s']:.0f} s | {r['peak_rss_bytes'] / 2**20:.0f} |"
            for name, r in rows.items()
        ),
        "",
        f"Command: `{payload['command']}`. Machine: {payload['machine']['platform']}, 2 CPUs, nothing else running.",
    ]
    atomic_write(RESULTS.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
