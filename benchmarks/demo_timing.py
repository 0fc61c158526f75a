"""`make demo` from a fresh clone, timed end to end, set-up included.

Clones the repository's committed HEAD into a temporary folder and runs `make demo` there with an
empty compresslm cache (no cached reference logits or calibration statistics), as a new user's
machine would; pip's own download cache is left as the machine has it. Records the wall time,
the lines the sweep printed for each point and the last lines of the run. Run it with nothing
else on the machine.

    .venv/bin/python benchmarks/demo_timing.py
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from point_runner import command_line
from results_store import atomic_write

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "demo_timing.json"
GOAL_S = 15 * 60


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
    with tempfile.TemporaryDirectory(prefix="compresslm-demo-") as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        env = {**os.environ, "COMPRESSLM_CACHE": str(Path(tmp) / "cache")}
        env.pop("VIRTUAL_ENV", None)
        started = time.perf_counter()
        run = subprocess.run(["make", "demo"], cwd=clone, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
    # compresslm writes its messages and progress bars on stderr: keep the messages, drop the bars
    text = run.stdout + run.stderr
    points = re.findall(r"[^\s|\]]+: ppl [\d.,]+, KL [\d.]+, [\d.]+ bits/param, \d+ s", text)
    lines = [line.rstrip() for line in text.replace("\r", "\n").splitlines()]
    lines = [line for line in lines if line.strip() and "%|" not in line]
    payload = {
        "exit": run.returncode,
        "wall_s": wall,
        "goal_s": GOAL_S,
        "points": points,
        "tail": lines[-6:],
        "commit": commit.stdout.strip(),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"processor": _cpu(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "command": command_line("benchmarks/demo_timing.py"),
    }
    atomic_write(RESULTS, json.dumps(payload, indent=2) + "\n")
    verdict = "within" if wall <= GOAL_S and run.returncode == 0 else "NOT within"
    text = [
        "# `make demo` from a fresh clone, timed end to end",
        "",
        f"Command: `{payload['command']}` (clones commit {payload['commit'][:10]}, runs `make demo` with an empty",
        "compresslm cache: virtual environment, pinned installs, the reference model's info, then the `default`",
        "grid's sweep and report). Machine: "
        f"{payload['machine']['processor']}, {payload['machine']['cpus']} CPUs, nothing else running, "
        f"{payload['date']}.",
        "",
        f"Wall time, set-up included: **{wall:.0f} s** (exit {run.returncode}; {verdict} the "
        f"{GOAL_S // 60}-minute goal).",
        "",
        "Per point, as the sweep printed it:",
        "",
        "```",
        *points,
        "```",
        "",
        "Last lines:",
        "",
        "```",
        *payload["tail"],
        "```",
    ]
    atomic_write(RESULTS.with_suffix(".md"), "\n".join(text) + "\n")
    print("\n".join(text))
    sys.exit(0 if run.returncode == 0 else 1)


if __name__ == "__main__":
    main()
