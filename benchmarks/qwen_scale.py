"""Qwen2.5-Coder-0.5B on two cores: peak memory and time of load, RTN, GPTQ and evaluation, before and after.

The same `compresslm` commands run with the source tree at `--ref` (checked out into a worktree) and
with a snapshot of the working tree, each command in its own process, one after the other; peak RSS
is the kernel's account of that process (wait4), not a sample. Each side starts with an empty model
cache, so its first command (`info`) pays for reading the GGUF and later ones load what it cached,
on both sides alike. GPTQ calibrates on 16 windows of 512 C4 tokens (seed 0), the windows of the
issue that asked for this table; the GPTQ containers are scored on the first `EVAL_WINDOWS` windows of
WikiText-2 test at ctx 2048 (a reduced protocol, labelled). llm-compressor's GPTQ on the same model,
the same 16 windows and the same scoring runs in its own environment (`LLMC_PYTHON`, see
`llmcompressor_anchor.py`), with the same recipe's grid (W4, group 128, asymmetric, act order).

    .venv/bin/python benchmarks/qwen_scale.py --ref 352a0de [--steps ...]   # resumable: finished steps are kept
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_store import atomic_write

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "qwen_scale.json"
MODEL = "qwen2.5-coder-0.5b"
BLOCKS = 24
CALIB = ["--calib-samples", "16", "--calib-len", "512"]
EVAL_WINDOWS = 8
LLMC_PYTHON = os.environ.get("LLMC_PYTHON", "/work/llmc-venv/bin/python")


def commands(work: Path) -> dict[str, list[str]]:
    evaluate = ["--ppl", "wikitext2", "--ctx", "2048", "--limit", str(EVAL_WINDOWS)]
    return {
        "load (info)": ["info", MODEL],
        "compress w4-g128-rtn": ["compress", MODEL, "--recipe", "w4-g128-rtn", "-o", str(work / "rtn.clm")],
        "compress w4-g128-gptq": ["compress", MODEL, "--recipe", "w4-g128-gptq", *CALIB, "-o",
                                  str(work / "gptq.clm")],
        "eval w4-g128-gptq": ["eval", str(work / "gptq.clm"), *evaluate],
        "compress w4-g128-gptq --stream": ["compress", MODEL, "--recipe", "w4-g128-gptq", *CALIB, "--stream", "-o",
                                           str(work / "gptq-stream.clm")],
        "eval w4-g128-gptq --stream": ["eval", str(work / "gptq-stream.clm"), *evaluate, "--stream"],
        "eval the before side's w4-g128-gptq": ["eval", str(work.parent / "before" / "gptq.clm"), *evaluate],
    }  # fmt: skip


def measured(command: list[str], env: dict) -> dict:
    """Run one command to its end; its wall time, peak RSS and JSON output."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        code = child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if code != 0:
        raise SystemExit(f"{' '.join(command[:4])} exited {code}: {stderr.strip()[-400:]}")
    lines = [line for line in stdout.splitlines() if line.strip()]
    try:
        payload = json.loads(stdout)
    except json.JSONDecodeError:
        payload = json.loads(lines[-1]) if lines else None
    return {"wall_s": round(time.perf_counter() - started, 1), "peak_rss_bytes": usage.ru_maxrss * 1024,
            "json": payload, "load_avg_after": round(os.getloadavg()[0], 2)}  # fmt: skip


def snapshot(commit: str, where: Path) -> Path:
    """A worktree of `commit` at `where` (made once)."""
    if not where.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), commit], check=True,
                       capture_output=True)  # fmt: skip
    return where


def llmc_gptq(work: Path) -> dict:
    """llm-compressor's GPTQ on the float model and our 16 calibration windows, scored by our perplexity."""
    import torch

    from compresslm.data.calibration import calibration_windows
    from compresslm.models.loading import load_model, save_model

    model_dir, windows = work / "float", work / "calib-c4-16x512-seed0.pt"
    if not (model_dir / "config.json").is_file() or not windows.is_file():
        lm = load_model(MODEL)
        save_model(lm, None, model_dir)
        torch.save(calibration_windows(lm.tokenizer, "c4", 16, 512, 0).windows, windows)
        del lm
    command = [LLMC_PYTHON, str(HERE / "llmcompressor_run.py"), "--model-dir", str(model_dir), "--calib",
               str(windows), "--method", "gptq", "--bits", "4", "--group", "128",
               "--limit", str(EVAL_WINDOWS)]  # fmt: skip
    return measured(command, {**os.environ, "PYTHONPATH": str(ROOT / "src")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="352a0de", help="the 'before' commit")
    parser.add_argument("--steps", nargs="*", default=None, help="run only these steps (names as in the table)")
    parser.add_argument("--sides", nargs="*", default=["before", "after"], help="run only these sides")
    parser.add_argument("--work", type=Path, default=Path("/tmp/compresslm-qwen-scale"))
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"sides": {}}
    # the last commit that changed the package: a commit of benchmarks or docs alone keeps the steps measured
    head = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h", "--", "src", "pyproject.toml"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    trees = {"before": (args.ref, snapshot(args.ref, args.work / f"tree-{args.ref}")),
             "after": (head, snapshot(head, args.work / f"tree-{head}"))}  # fmt: skip
    from compresslm.versions import versions

    results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "versions": versions()}
    for side, (commit, tree) in trees.items():
        work = args.work / side
        work.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(tree / "src"), "COMPRESSLM_CACHE": str(work / "cache")}
        entry = results["sides"].setdefault(side, {"commit": commit, "steps": {}})
        if entry["commit"] != commit:
            entry.update(commit=commit, steps={})
        for name, command in commands(work).items():
            if side == "before" and ("--stream" in name or "before side" in name):
                continue  # the before tree streams nothing of this model; the after tree scores its container
            if name in entry["steps"] or (args.steps and name not in args.steps) or side not in args.sides:
                continue
            if name == "load (info)":  # the side's first command reads the GGUF itself, not a copy left by a run before
                shutil.rmtree(work / "cache", ignore_errors=True)
            print(f"{side}: {name}", file=sys.stderr)
            full = [sys.executable, "-m", "compresslm.cli", *command, "--json"]
            full += [] if command[0] == "info" else ["--quiet"]  # info has no progress bars (nor the flag, before)
            entry["steps"][name] = measured(full, env)
            atomic_write(RESULTS, json.dumps(results, indent=1))
    if "llm-compressor" not in results and (not args.steps or "llm-compressor" in args.steps) and "after" in args.sides:
        print("llm-compressor: gptq", file=sys.stderr)
        results["llm-compressor"] = llmc_gptq(args.work / "llm-compressor")
        atomic_write(RESULTS, json.dumps(results, indent=1))
    write_markdown(results)


def _layer_work(payload: dict) -> float:
    """Seconds spent on the linears themselves (GPTQ and the error report), summed from the per-layer report."""
    return sum(layer["seconds"] for layer in payload["layers"])


def _per_block(sides: dict) -> list[str]:
    """GPTQ's time per block before and after: the whole compression, and the linears' own work."""
    runs = [
        side["steps"].get("compress w4-g128-gptq", {}).get("json")
        for side in (sides.get("before", {}), sides.get("after", {}))
    ]
    if not all(runs):
        return []
    whole = [run["compression_seconds"] / BLOCKS for run in runs]
    work = [_layer_work(run) / BLOCKS for run in runs]
    return ["", "## GPTQ per block, before and after", "",
            "| | before | after | speed-up |", "|---|---:|---:|---:|",
            f"| whole compression (calibration forwards, statistics, GPTQ, report) | {whole[0]:.2f} s | "
            f"{whole[1]:.2f} s | {whole[0] / whole[1]:.2f}x |",
            f"| GPTQ and its error report (the per-layer report's seconds) | {work[0]:.2f} s | {work[1]:.2f} s | "
            f"{work[0] / work[1]:.2f}x |"]  # fmt: skip


def write_markdown(results: dict) -> None:
    gib = 2**30
    sides = results["sides"]
    names = list(dict.fromkeys(name for side in sides.values() for name in side["steps"]))
    lines = [
        "# Qwen2.5-Coder-0.5B on two cores: load, RTN, GPTQ and evaluation, before and after",
        "",
        f"Model: `{MODEL}` (the 4-bit GGUF of Qwen2.5-Coder-0.5B-Instruct, {BLOCKS} blocks, dequantized to float32 "
        "at load). GPTQ: W4 group 128 (act order, static groups), 16 x 512 C4 calibration windows (seed 0). "
        f"Evaluation: WikiText-2 test, ctx 2048, the first {EVAL_WINDOWS} windows (a reduced protocol). "
        + ", ".join(f"{side}: the source tree at {s['commit']}" for side, s in sides.items())
        + ". Every command is its own process, run one after another; peak RSS is the kernel's (wait4). "
        "Each side begins with an empty model cache: its `info` reads the GGUF, later commands load the copy "
        "it cached.",
        f"Machine: {results['machine']['platform']}, {results['machine']['cpus']} CPUs; "
        + ", ".join(f"{k} {v}" for k, v in results["machine"]["versions"].items() if k in ("torch", "transformers")),
        *([f"Conditions: {results['note']}"] if results.get("note") else []),
        "",
        "| step | " + " | ".join(f"{side} wall | {side} peak RSS" for side in sides) + " | result (after) |",
        "|---|" + "---:|---:|" * len(sides) + "---|",
    ]
    for name in names:
        cells = []
        for side in sides.values():
            step = side["steps"].get(name)
            cells += [f"{step['wall_s']:.0f} s", f"{step['peak_rss_bytes'] / gib:.2f} GiB"] if step else ["–", "–"]
        final = sides.get("after", {}).get("steps", {}).get(name, {}).get("json") or {}
        outcome = ""
        if "ppl" in final:
            before = sides.get("before", {}).get("steps", {}).get(name, {}).get("json") or {}
            outcome = f"ppl {final['ppl']:.4f}" + (f" (before {before['ppl']:.4f})" if "ppl" in before else "")
        elif "bytes_on_disk" in final:
            outcome = f"{final['bytes_on_disk'] / 2**20:.0f} MiB file"
            if final.get("compression_seconds"):
                outcome += f", {final['compression_seconds'] / BLOCKS:.1f} s per block (compression only)"
            if final.get("layers") and any(layer["relative_error"] is not None for layer in final["layers"]):
                outcome += f", {_layer_work(final) / BLOCKS:.2f} s per block in GPTQ and its error report"
        lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {outcome} |")
    llmc = results.get("llm-compressor")
    ours = sides.get("after", {}).get("steps", {})
    if llmc and "compress w4-g128-gptq" in ours and "eval w4-g128-gptq" in ours:
        row = llmc["json"]
        compressed, scored = ours["compress w4-g128-gptq"], ours["eval w4-g128-gptq"]
        lines += ["", "## GPTQ W4 g128 side by side with llm-compressor (same model, windows and scoring)", "",
                  "llm-compressor loads the float32 model whole, compresses it (`oneshot`, sequential pipeline, its "
                  "GPTQ defaults: block 128, dampening 0.01, static act order; lm_head left dense) and is scored in "
                  "the same process, so its peak covers both; compresslm's compression and scoring are two "
                  "processes, and the larger peak is shown.", "",
                  "| tool | GPTQ seconds | peak RSS | ppl |", "|---|---:|---:|---:|",
                  f"| {row['tool']} | {row['compress_seconds']:.0f} | {llmc['peak_rss_bytes'] / gib:.2f} GiB "
                  f"| {row['ppl']:.4f} |",
                  f"| compresslm ({sides['after']['commit']}) | {compressed['json']['compression_seconds']:.0f} "
                  f"| {max(compressed['peak_rss_bytes'], scored['peak_rss_bytes']) / gib:.2f} GiB "
                  f"| {scored['json']['ppl']:.4f} |"]  # fmt: skip
        streamed, streamed_eval = ours.get("compress w4-g128-gptq --stream"), ours.get("eval w4-g128-gptq --stream")
        if streamed and streamed_eval:
            lines.append(f"| compresslm ({sides['after']['commit']}), `--stream` | "
                         f"{streamed['json']['compression_seconds']:.0f} "
                         f"| {max(streamed['peak_rss_bytes'], streamed_eval['peak_rss_bytes']) / gib:.2f} GiB "
                         f"| {streamed_eval['json']['ppl']:.4f} |")  # fmt: skip
    lines += _per_block(sides)
    lines += ["", "Command: `.venv/bin/python benchmarks/qwen_scale.py --ref 352a0de` (resumable)."]
    atomic_write(RESULTS.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
