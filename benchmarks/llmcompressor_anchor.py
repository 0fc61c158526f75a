"""compresslm against llm-compressor, side by side: same model, same calibration windows, same protocol.

The reference model is written once as a float32 Hugging Face directory; the 128 × 512 C4
calibration windows (seed 0) that our engine uses are saved as a tensor and handed to
llm-compressor's `oneshot` as a pre-tokenized dataset, and the same windows to our `compress`.
`--calib-samples N` runs both tools on the first N of those windows instead (the same seeded draws)
and writes its own table, `llmcompressor_anchor_<N>x512`: a labelled reduced protocol for points
too slow on this CPU at 128 windows. llm-compressor runs in its own virtual
environment (`LLMC_PYTHON`, default /work/llmc-venv/bin/python, made with
`pip install torch==2.13.0 llmcompressor`); both sides are evaluated by compresslm's perplexity
function (WikiText-2 test, GPTQ rows, ctx 2048, first 40 windows) and timed in this one run,
one point after the other, so their wall times are comparable. Resumable like the other scripts.

    .venv/bin/python benchmarks/llmcompressor_anchor.py [--calib-samples 128] [--points ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from results_store import add_row, atomic_write, load_rows

HERE = Path(__file__).parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "llmcompressor_anchor"
WORK = Path(os.environ.get("COMPRESSLM_BENCH_WORK", ROOT / ".bench-work"))
PROTOCOL_SAMPLES = 128  # calibration windows of the benchmark protocol (DESIGN.md)
LLMC_PYTHON = os.environ.get("LLMC_PYTHON", "/work/llmc-venv/bin/python")

# name: (tool, method, bits, group, symmetric) ; our side names a compresslm preset
POINTS = {
    "llm-compressor gptq w4 g64 sym": ("llmc", "gptq", 4, 64, True),
    "llm-compressor gptq w4 g64 asym": ("llmc", "gptq", 4, 64, False),
    "compresslm w4-g64-gptq-sym": ("ours", "w4-g64-gptq-sym", 4, 64, True),
    "compresslm w4-g64-gptq-noact": ("ours", "w4-g64-gptq-noact", 4, 64, False),
    "compresslm w4-g64-gptq-act": ("ours", "w4-g64-gptq-act", 4, 64, False),
    "llm-compressor awq w4 g64 asym": ("llmc", "awq", 4, 64, False),
    "compresslm w4-g64-awq": ("ours", "w4-g64-awq", 4, 64, False),
}


def prepare(samples: int) -> tuple[Path, Path]:
    import torch

    from compresslm.data.calibration import calibration_windows
    from compresslm.models.loading import load_model, save_model

    WORK.mkdir(parents=True, exist_ok=True)
    model_dir, calib = WORK / "smollm2-135m-fp32", WORK / f"calib-c4-{samples}x512-seed0.pt"
    if not (model_dir / "config.json").exists() or not calib.exists():
        lm = load_model("smollm2-135m")
        save_model(lm, None, model_dir)
        torch.save(calibration_windows(lm.tokenizer, "c4", samples, 512, 0).windows, calib)
    return model_dir, calib


def run_ours(preset: str, limit: int, samples: int) -> dict:
    code = (
        "import json,sys,resource,time\n"
        "from compresslm.api import compress\n"
        "from compresslm.data.calibration import calibration_windows\n"
        "from compresslm.eval.perplexity import perplexity\n"
        "from compresslm.models.loading import load_model\n"
        "lm = load_model(sys.argv[1])\n"
        "calib = calibration_windows(lm.tokenizer, 'c4', int(sys.argv[4]), 512, 0)\n"
        "_, result, _ = compress(lm, sys.argv[2], calibration=calib, show_progress=False)\n"
        "ppl = perplexity(lm, 'wikitext2', ctx=2048, limit=int(sys.argv[3]), show_progress=False)\n"
        "print(json.dumps({'tool': 'compresslm', 'ppl': ppl.ppl, 'compress_seconds': result.seconds,\n"
        "  'peak_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,\n"
        "  'calibration': result.calibration, 'eval_protocol': ppl.protocol}))\n"
    )
    model_dir, _ = prepare(samples)
    proc = subprocess.run([sys.executable, "-c", code, str(model_dir), preset, str(limit), str(samples)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_llmc(method: str, bits: int, group: int, symmetric: bool, limit: int, samples: int) -> dict:
    model_dir, calib = prepare(samples)
    cmd = [LLMC_PYTHON, str(HERE / "llmcompressor_run.py"), "--model-dir", str(model_dir), "--calib", str(calib),
           "--method", method, "--bits", str(bits), "--group", str(group), "--limit", str(limit)]  # fmt: skip
    if symmetric:
        cmd.append("--symmetric")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    # its progress bars pass through to our stderr: an AWQ point runs for an hour or more here
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False, env=env)
    if proc.returncode:
        raise SystemExit(f"llm-compressor exited with status {proc.returncode}; its messages are above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _load(row: dict) -> str:
    load = row.get("load_avg_at_end")
    return "–" if load is None else f"{load:.1f}"


def results_path(samples: int) -> Path:
    return RESULTS if samples == PROTOCOL_SAMPLES else RESULTS.with_name(f"{RESULTS.name}_{samples}x512")


def write_markdown(rows: dict, samples: int) -> None:
    first = next(iter(rows.values()))
    p = first["eval_protocol"]
    reduced = "" if samples == PROTOCOL_SAMPLES else f", {samples} calibration windows"
    option = "" if samples == PROTOCOL_SAMPLES else f" --calib-samples {samples}"
    lines = [
        f"# compresslm vs llm-compressor on `smollm2-135m` (W4, group 64{reduced})",
        "",
        f"Same float32 model, the same {samples} × 512-token C4 calibration windows (seed 0) given to both tools,",
        f"evaluated by the same function: WikiText-2 raw test, ctx {p['ctx']}, first {p['windows']} "
        f"windows ({p['tokens_scored']:,} tokens). The points of one method ran one after another on this machine.",
    ]
    if samples != PROTOCOL_SAMPLES:
        lines += ["", f"A reduced protocol: the benchmark's is 128 windows (`llmcompressor_anchor.md`); this "
                  f"table shows both tools with {samples}. Compare rows of this table with each other, not with "
                  "that one."]  # fmt: skip
    lines += [
        "",
        "| tool | method | grid | ppl | compress s | peak RSS MiB | load avg at end |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        _, method, bits, group, sym = POINTS[name]
        grid = f"W{bits} g{group} {'sym' if sym else 'asym'}"
        lines.append(f"| {row['tool']} | {method} | {grid} | {row['ppl']:.3f} | {row['compress_seconds']:.0f} "
                     f"| {row['peak_rss_bytes'] / 2**20:.0f} | {_load(row)} |")  # fmt: skip
    threads = sorted({row["eval_protocol"].get("torch_threads") for row in rows.values()} - {None})
    ran_with = f", torch threads {', '.join(map(str, threads))}" if threads else ""
    unrecorded = " The GPTQ rows ran with nothing else on the machine (their load was not yet recorded)."
    unrecorded = unrecorded if samples == PROTOCOL_SAMPLES else ""
    lines += [
        "",
        f"Command: `.venv/bin/python benchmarks/llmcompressor_anchor.py{option}`. llm-compressor ran with its defaults",
        "for each modifier apart from the quantization scheme: for GPTQ block size 128, dampening 0.01 and",
        "**act-order static** (its default); for AWQ its Llama mappings, a 20-point scale grid with duo scaling",
        "and no clip search, then min-max rounding; sequential pipeline; lm_head ignored. compresslm's `-act` row",
        "is the same GPTQ (now compresslm's default); `-noact` quantizes columns in natural order with dynamic",
        "groups; `w4-g64-awq` is AWQ's scale search (20 points) followed by a clip search, then rounding.",
        "compresslm rows store embeddings and norms as float16. Wall times: both tools on",
        f"the same 2 CPU cores, one point after the other{ran_with}.{unrecorded} A load average well above the",
        "thread count means another job shared the cores and the row's time is inflated: compare times only",
        "between rows of similar load.",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs; {p['versions']['platform']}.",
    ]
    for name, row in rows.items():
        if row.get("patch"):
            lines.append(f"- {name} ran with one change to llm-compressor: {row['patch']}.")
    seen = set()
    for row in rows.values():
        v = row["eval_protocol"]["versions"]
        line = f"- {row['tool']}: torch {v['torch']}, transformers {v['transformers']}, python {v['python']}"
        if line not in seen:
            seen.add(line)
            lines.append(line)
    atomic_write(results_path(samples).with_suffix(".md"), "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", nargs="*", default=list(POINTS))
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument(
        "--calib-samples", type=int, default=PROTOCOL_SAMPLES, help="calibration windows of 512 tokens, both tools"
    )
    args = parser.parse_args()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    json_path = results_path(args.calib_samples).with_suffix(".json")
    rows = load_rows(json_path)
    for name in args.points:
        if name in rows:
            continue
        tool, method, bits, group, sym = POINTS[name]
        print(f"[{name}] running", file=sys.stderr, flush=True)
        if tool == "ours":
            row = run_ours(method, args.limit, args.calib_samples)
        else:
            row = run_llmc(method, bits, group, sym, args.limit, args.calib_samples)
        # the 1-minute load average as the point ends: about 1-2 when it ran alone on the 2 cores
        row["load_avg_at_end"] = os.getloadavg()[0]
        rows = add_row(json_path, name, row)
        print(f"[{name}] ppl {rows[name]['ppl']:.3f} in {rows[name]['compress_seconds']:.0f} s", file=sys.stderr)
    write_markdown({name: rows[name] for name in POINTS if name in rows}, args.calib_samples)


if __name__ == "__main__":
    main()
