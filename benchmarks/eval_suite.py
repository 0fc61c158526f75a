"""The evaluation suite on the reference model: tasks with error bars, KL divergence, speed and memory.

Points (each saved before the next starts; rerunning skips finished points):

* `task <name> <model>`: one task of `compresslm.eval.tasks.ALL_TASKS` on float32 `smollm2-135m`
  (one point per task, so an interrupted run resumes at the next task), read
  from the shared data directory (`--data-dir`, default ../shared/data). Tasks larger than
  `--task-limit` items are scored on a seeded random subset of that size (seed 0), which the
  table says; GSM8K uses `--gsm8k-limit` items (greedy generation is slow on CPU).
* `kld <recipe>`: KL(float32 ‖ compressed), top-1 agreement and ppl of RTN containers (W8, W4 g64,
  W3 g64) and of the float32 model itself, WikiText-2 test, GPTQ rows, ctx 2048, first 40 windows.
* `speed <recipe>`: prefill/decode tokens/s at batch 1 and 8 (prompt 512, 64 new tokens, 1 warm-up
  + 5 timed runs), float32 and a W4 container (which runs dequantized on CPU: no faster).

    .venv/bin/python benchmarks/eval_suite.py [--points "task arc_easy fp32" ...] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from point_runner import footer, table_main
from results_store import atomic_write

from compresslm.eval.tasks import ALL_TASKS

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "eval_suite"
DEFAULT_POINTS = [
    "kld fp32",
    "kld w8-rtn",
    "kld w4-g64-rtn",
    "kld w3-g64-rtn",
    "speed fp32",
    "speed w4-g64-rtn",
    *(f"task {name} fp32" for name in ALL_TASKS),
]


def _model(recipe: str, workdir: Path):
    from compresslm.api import compress
    from compresslm.models.loading import load_model

    if recipe == "fp32":
        return load_model("smollm2-135m")
    path = workdir / f"{recipe}.clm"
    compress("smollm2-135m", recipe, path, show_progress=False)
    return load_model(path)


def run_point(name: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return _measure(name, args, Path(tmp))


def _measure(name: str, args: argparse.Namespace, workdir: Path) -> dict:
    kind, rest = name.split(" ", 1)
    task_name, recipe = rest.split(" ", 1) if kind == "task" else (None, rest)
    lm = _model(recipe, workdir)
    if kind == "kld":
        from compresslm.eval.distance import distance, reference_logits
        from compresslm.models.loading import load_model

        reference = reference_logits(load_model("smollm2-135m"), "wikitext2", ctx=2048, limit=40, show_progress=False)
        result = distance(lm, reference, "wikitext2", show_progress=False).to_dict()
        result.pop("window_nll")
        return {"point": name, **result}
    if kind == "speed":
        from compresslm.eval.speed import measure_speed

        return {"point": name, **measure_speed(lm, batch_sizes=(1, 8)).to_dict()}
    if kind != "task":
        raise SystemExit(f"unknown point kind {kind!r} in {name!r}; expected kld, speed or task")
    from compresslm.eval.harness import evaluate_task
    from compresslm.eval.tasks import load_task

    task = load_task(task_name, args.data_dir)
    limit = args.gsm8k_limit if task.kind == "generation" else args.task_limit
    result = evaluate_task(lm, task, limit=limit, seed=0, show_progress=False)
    return {
        "point": name,
        "task": task_name,
        "model": recipe,
        **result.metrics,
        "n": result.n,
        "protocol": result.protocol,
    }


def _fmt(metrics: dict, key: str) -> str:
    if key not in metrics:
        return ""
    err = metrics.get(f"{key}_stderr")
    return f"{metrics[key]:.4f}" + (f" ± {err:.4f}" if err is not None and err == err else "")


def write_markdown(rows: dict) -> None:
    lines = ["# Evaluation suite on `smollm2-135m`", ""]
    kld = [r for r in rows.values() if r["point"].startswith("kld")]
    if kld:
        p = kld[0]["protocol"]
        lines += [
            "## Distance to the float32 model",
            "",
            f"WikiText-2 {p['split']} (GPTQ rows), ctx {p['ctx']}, first {p['windows']} windows, {kld[0]['tokens']:,} "
            f"tokens. KL over the reference's top-64 tokens plus a rest bucket (a lower bound on the full KL; the "
            f"reference's mean mass outside its top 64: {p['reference_mass_outside_top_k']:.4f}). Standard errors "
            "over windows.",
            "",
            "| model | ppl | KL mean ± s.e. | KL median | KL p99 | KL max | same top token | Δp mean |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in kld:
            pct = r["kld_percentiles"]
            lines.append(
                f"| {r['point'].split(' ', 1)[1]} | {r['ppl']:.3f} | {r['kld_mean']:.5f} ± {r['kld_stderr']:.5f} "
                f"| {pct['p50']:.5f} | {pct['p99']:.4f} | {r['kld_max']:.3f} "
                f"| {100 * r['top1_agreement']:.2f} % ± {100 * r['top1_stderr']:.2f} | {r['delta_p_mean']:+.5f} |"
            )
        lines.append("")
    speed = [r for r in rows.values() if r["point"].startswith("speed")]
    if speed:
        p = speed[0]["protocol"]
        lines += [
            "## Speed and memory",
            "",
            f"{p['workload']}; {p['warmup_runs']} warm-up + {p['timed_runs']} timed runs, median [min-max]; "
            f"{p['device']}, {p['torch_threads']} torch threads. Energy: {speed[0]['energy']}.",
            "",
            "| model | batch | prefill tok/s | decode tok/s | first token ms | KV cache MiB | model MiB in memory |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in speed:
            for batch, b in r["per_batch"].items():
                pre, dec, ttft = b["prefill_tokens_per_s"], b["decode_tokens_per_s"], b["time_to_first_token_s"]
                lines.append(
                    f"| {r['point'].split(' ', 1)[1]} | {batch} "
                    f"| {pre['median']:.0f} [{pre['min']:.0f}-{pre['max']:.0f}] "
                    f"| {dec['median']:.1f} [{dec['min']:.1f}-{dec['max']:.1f}] | {1000 * ttft['median']:.0f} "
                    f"| {b['kv_cache_bytes'] / 2**20:.1f} | {r['model_bytes_in_memory'] / 2**20:.0f} |"
                )
        lines += ["", "A W4 container runs with its weights dequantized to float32 on CPU (no low-bit kernel), so "
                  "it is not expected to be faster; it is smaller on disk.", ""]  # fmt: skip
        lines += [f"Note on {r['point']}: {r['note']}" for r in speed if r.get("note")] + [""]
    task_rows = [r for r in rows.values() if r["point"].startswith("task ")]
    for model in dict.fromkeys(r["model"] for r in task_rows):
        lines += [
            f"## Tasks ({model})",
            "",
            "Log-likelihood scoring in the lm-evaluation-harness formats; acc_norm per character; ECE of the choice "
            "probabilities (10 bins); standard errors over items. A subset is a seeded random sample (seed 0).",
            "",
            "| task | n / available | acc ± s.e. | acc_norm ± s.e. | ECE | other | data |",
            "|---|---:|---:|---:|---:|---|---|",
        ]
        for m in (r for r in task_rows if r["model"] == model):
            p = m["protocol"]
            if "ppl" in m:
                other = f"ppl {m['ppl']:.2f}"
            elif "exact_match" in m:
                other = f"exact match {_fmt(m, 'exact_match')}"
            else:
                other = ""
            ece = f"{m['ece']:.3f}" if "ece" in m else ""
            data = p["note"] or Path(p["files"][0]).parent.name
            lines.append(
                f"| {m['task']} | {m['n']} / {p['items_available']} | {_fmt(m, 'acc')} | {_fmt(m, 'acc_norm')} "
                f"| {ece} | {other} | {data} |"
            )
        lines.append("")
    lines += footer(rows_with_protocol(rows), ".venv/bin/python benchmarks/eval_suite.py")
    atomic_write(RESULTS.with_suffix(".md"), "\n".join(lines) + "\n")


def rows_with_protocol(rows: dict) -> dict:
    """footer() reads versions from an eval_protocol; give each row one."""
    out = {}
    for name, row in rows.items():
        versions = row["protocol"]["versions"]
        out[name] = {**row, "eval_protocol": {"versions": versions}}
    return out


def main() -> None:
    data_dir = str(HERE.parent.parent / "shared" / "data")
    options = [("--data-dir", str, data_dir), ("--task-limit", int, 500), ("--gsm8k-limit", int, 50)]
    done = table_main(__file__, RESULTS, DEFAULT_POINTS, run_point, options)
    if done and done[0]:
        write_markdown(done[0])


if __name__ == "__main__":
    main()
