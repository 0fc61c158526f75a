"""Peak memory of a streamed GPTQ compression at 7B block size, before and after a change, side by side.

A Llama-2-7B configuration cut to two blocks (random weights, bfloat16 safetensors, one shard per
block; `scale.py make --layers 2`) is compressed `w4-g128-gptq --stream` with 8 calibration windows
of 512 tokens, once by the source tree at `--ref` (a git commit, checked out into a temporary
worktree) and once by the working tree, each in its own process; peak RSS is the kernel's account
of that process (wait4). A streamed compression holds one block at a time, so the two-block peak is
the per-block peak that `scale.py` meets at 32 blocks (plus what grows with the block count, which
this does not measure). Random weights: nothing here says anything about quality.

    .venv/bin/python benchmarks/block_memory.py --ref fd86403 [--model /tmp/l7b2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_store import atomic_write

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "block_memory.json"
RECIPE = "w4-g128-gptq"
CALIBRATION = {"samples": 8, "length": 512}


def peak(src: Path, model: Path, output: Path) -> dict:
    """Compress `model` with the package at `src`; its wall time and peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    command = [sys.executable, "-m", "compresslm.cli", "compress", str(model), "--recipe", RECIPE, "--stream",
               "--calib-samples", str(CALIBRATION["samples"]), "--calib-len", str(CALIBRATION["length"]),
               "-o", str(output), "--quiet"]  # fmt: skip
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{src}: compress exited {code}")
    return {"peak_rss_bytes": usage.ru_maxrss * 1024, "wall_s": round(time.perf_counter() - started, 1)}


def write_markdown(results: dict) -> None:
    before, after = results["before"], results["after"]
    gib = 2**30
    lines = [
        "# Peak memory of a streamed GPTQ compression at 7B block size",
        "",
        f"Model: Llama-2-7B configuration cut to {results['blocks']} blocks, random weights, bfloat16 "
        f"safetensors, computed in float32. Recipe `{RECIPE} --stream`, calibration {CALIBRATION['samples']} x "
        f"{CALIBRATION['length']} C4 windows. Before: the source tree at {results['ref']}; after: the working tree "
        f"at {results['head']}. Each run is its own process; peak RSS from wait4.",
        "",
        "| | peak RSS | wall time |",
        "|---|---:|---:|",
        f"| before | {before['peak_rss_bytes'] / gib:.2f} GiB | {before['wall_s']:.0f} s |",
        f"| after | {after['peak_rss_bytes'] / gib:.2f} GiB | {after['wall_s']:.0f} s |",
        "",
        f"Peak RSS after / before: {after['peak_rss_bytes'] / before['peak_rss_bytes']:.2f}. {results['conditions']}",
        "",
        f"Command: `{results['command']}`. Machine: {results['platform']}, {os.cpu_count()} CPUs; "
        f"torch {results['torch']}.",
    ]
    atomic_write(RESULTS.with_suffix(".md"), "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", required=True, help="git commit holding the code to compare against")
    parser.add_argument("--model", type=Path, default=Path("/tmp/l7b2"), help="made by scale.py make --layers 2")
    parser.add_argument("--conditions", default="Run alone.", help="what else ran on the machine meanwhile")
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        subprocess.run([sys.executable, str(HERE / "scale.py"), "make", "--out", str(args.model), "--layers", "2"],
                       check=True)  # fmt: skip
    import torch

    root = HERE.parent
    with tempfile.TemporaryDirectory() as tmp:
        worktree = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(worktree), args.ref], cwd=root, check=True)
        try:
            before = peak(worktree / "src", args.model, Path(tmp) / "before.clm")
            after = peak(root / "src", args.model, Path(tmp) / "after.clm")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=root, check=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout
    config = json.loads((args.model / "config.json").read_text())
    results = {"ref": args.ref, "head": head.strip(), "blocks": config["num_hidden_layers"], "before": before,
               "after": after, "conditions": args.conditions, "platform": platform.platform(),
               "torch": torch.__version__,
               "command": f".venv/bin/python benchmarks/block_memory.py --ref {args.ref}"}  # fmt: skip
    atomic_write(RESULTS, json.dumps(results, indent=2) + "\n")
    write_markdown(results)
    print(RESULTS.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
