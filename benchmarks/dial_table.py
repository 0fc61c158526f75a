"""The dial on the reference model: one artifact's settings against dedicated compressions, one run.

Points (each in its own subprocess, saved before the next starts; rerunning skips finished ones):

* `artifact`: compress `smollm2-135m` with the `dial` recipe (GPTQ, group 64: 8-bit codes whose
  top 4 bits are the 4-bit width, 3 bits as codes of their own; the benchmark calibration) into
  `--workdir`/dial.clm; its size and compression time.
* `dial bits=B[,sparsity=S]`: load the artifact, switch it in memory (`set_budget`), evaluate.
* `switch`: the time `set_budget` takes for each setting in turn, in memory: the first round, and
  the median of the four after it. `--artifact PATH` uses an artifact made elsewhere (a sweep's).
* `<preset>`: the dedicated compression of the same setting (GPTQ g64 at 8/4/3 bits, SparseGPT
  at 50 %/70 %), through `point_runner.run_point` (written, reloaded, evaluated).

Evaluation everywhere: WikiText-2 raw test, GPTQ rows, ctx 2048, first 40 windows.

    .venv/bin/python benchmarks/dial_table.py [--points ...] [--workdir DIR] [--recipe dial]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import point_runner
from results_store import atomic_write

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "dial_table"
SETTINGS = ["bits=8", "bits=4", "bits=3", "bits=8,sparsity=0.5", "bits=8,sparsity=0.6", "bits=8,sparsity=0.7",
            "bits=4,sparsity=0.5"]  # fmt: skip
DEDICATED = {  # the dedicated compression each dial setting is held against
    "bits=8": "w8-g64-gptq",
    "bits=4": "w4-g64-gptq",
    "bits=3": "w3-g64-gptq",
    "bits=8,sparsity=0.5": "50%-sparsegpt",
    "bits=8,sparsity=0.7": "70%-sparsegpt",
}
DEFAULT_POINTS = ["artifact", *(f"dial {s}" for s in SETTINGS), "switch", *DEDICATED.values()]


def _artifact(workdir: Path, recipe: str) -> Path:
    return workdir / f"{recipe}.clm"


def run_point(name: str, args: argparse.Namespace) -> dict:
    from compresslm.dial import parse_setting, set_budget
    from compresslm.eval.perplexity import perplexity
    from compresslm.formats.container import container_summary
    from compresslm.models.assemble import load_compressed
    from compresslm.models.loading import load_model

    path = Path(args.artifact) if args.artifact else _artifact(Path(args.workdir), args.recipe)
    where = point_runner.use_device(args.device)
    if name == "artifact":
        from compresslm.api import compress

        path.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        _, result, summary = compress(load_model("smollm2-135m", device=args.device), args.recipe, path,
                                      show_progress=False)  # fmt: skip
        return {"point": name, **summary, "compress_seconds": result.seconds,
                "compress_and_save_seconds": time.perf_counter() - started, "recipe": result.recipe.to_dict(),
                "calibration": result.calibration, **where}  # fmt: skip
    if not path.exists():
        raise SystemExit(f"{path} is missing: run the 'artifact' point first (same --workdir)")
    if name == "switch":
        lm = load_compressed(path, device=args.device)
        times: dict[str, list[float]] = {s: [] for s in SETTINGS}
        for _ in range(5):
            for setting in SETTINGS:
                values = parse_setting(setting)
                times[setting].append(set_budget(lm, values.get("bits"), values.get("sparsity", 0.0)).seconds)
        # the first round apart: the first sparse setting outside the nested-sparse plane sorts each
        # layer's fixed keep order once (kept for every later switch)
        return {"point": name, "seconds": {s: statistics.median(t[1:]) for s, t in times.items()},
                "first_seconds": {s: t[0] for s, t in times.items()},
                "seconds_max": {s: max(t[1:]) for s, t in times.items()}, "rounds": 5, "artifact": str(path),
                "load_avg_at_end": os.getloadavg()[0], **where}  # fmt: skip
    if name.startswith("dial "):
        setting = parse_setting(name.split(" ", 1)[1])
        lm = load_compressed(path, device=args.device)
        report = set_budget(lm, setting.get("bits"), setting.get("sparsity", 0.0))
        with tempfile.TemporaryDirectory() as tmp:  # the setting's own size, as a fixed container
            from compresslm.dial import materialize

            _, fixed = materialize(path, Path(tmp) / "fixed.clm", setting.get("bits"), setting.get("sparsity", 0.0))
        ppl = perplexity(lm, "wikitext2", ctx=2048, limit=args.limit, show_progress=False)
        return {"point": name, "ppl": ppl.ppl, "switch_seconds": report.seconds, "setting": setting,
                "materialized": fixed, "artifact": container_summary(path), "eval_protocol": ppl.protocol,
                **where}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        return point_runner.run_point(name, "smollm2-135m", args.limit, Path(tmp), args.device)


def _layout(recipe: dict | None) -> str:
    """How the artifact's widths are stored, read from its recipe."""
    stage = next((s for s in (recipe or {}).get("stages", []) if s.get("nested_widths")), {})
    chain, separate = stage.get("nested_widths", [3, 4, 8]), stage.get("separate_widths", [])
    method = {"gptq": "GPTQ", "rtn": "RTN"}.get(stage.get("method", "gptq"), stage.get("method"))
    text = f"{method}, group {stage.get('group_size', 64)}, nested widths {'/'.join(map(str, chain))} sharing one code"
    if separate:
        text += f" (narrower widths are its top bits), {'/'.join(map(str, separate))} bits as codes of their own"
    else:
        text += " (narrower widths are its top bits)"
    levels = stage.get("dial_sparsity")
    if levels:
        return text + (
            f". Sparsity at {stage.get('bits', 8)} bits: a nested-sparse plane (one order, values updated as "
            f"SparseGPT would for {'/'.join(f'{int(100 * s)}' for s in levels)} %, weighted "
            f"{'/'.join(map(str, stage.get('dial_sparsity_priorities') or [1] * len(levels)))}); at other widths "
            "one Wanda-score order of the dense weights, no weight updates"
        )
    return text + ". Sparsity: one Wanda-score order of the 8-bit weights, no weight updates"


def write_markdown(rows: dict, results: Path = RESULTS) -> None:
    art = rows.get("artifact")
    lines = ["# The dial on `smollm2-135m`: one artifact against dedicated compressions", ""]
    if art:
        lines += [
            f"Artifact: {_layout(art.get('recipe'))}; {art['bytes_on_disk']:,} bytes "
            f"({art['bits_per_param']:.3f} bits/param, "
            f"{art['linear_bits_per_param']:.3f} linear bits), compressed in {art['compress_seconds']:.0f} s.",
            "",
        ]
    has_ppl = any(name.startswith("dial ") for name in rows)  # a switch-only run has no ppl table or plot
    if has_ppl:
        lines += [
            "Eval: WikiText-2 raw test, GPTQ rows, ctx 2048, first 40 windows; every row measured in this run.",
            "",
            "| setting | dial ppl | dedicated | dedicated ppl | dial / dedicated | dial setting bytes "
            "| dedicated bytes |",
            "|---|---:|---|---:|---:|---:|---:|",
        ]
    dedicated_bytes = 0
    for setting in SETTINGS:
        row = rows.get(f"dial {setting}")
        if row is None:
            continue
        ref = rows.get(DEDICATED.get(setting, ""))
        ratio = f"{row['ppl'] / ref['ppl']:.3f}" if ref else ""
        if ref:
            dedicated_bytes += ref["bytes_on_disk"]
        lines.append(
            f"| {setting} | {row['ppl']:.3f} | {DEDICATED.get(setting, '–')} | {ref['ppl']:.3f} | {ratio} "
            f"| {row['materialized']['bytes_on_disk']:,} | {ref['bytes_on_disk']:,} |"
            if ref
            else f"| {setting} | {row['ppl']:.3f} | – | | | {row['materialized']['bytes_on_disk']:,} | |"
        )
    if art and dedicated_bytes:
        lines += ["", f"The artifact ({art['bytes_on_disk']:,} bytes) against the dedicated containers above "
                  f"together ({dedicated_bytes:,} bytes): {art['bytes_on_disk'] / dedicated_bytes:.2f}x."]  # fmt: skip
    switch = rows.get("switch")
    if switch:
        first = switch.get("first_seconds")
        rounds = switch["rounds"]
        lines += ["", f"Switching in memory (`set_budget`, one setting after another, {rounds} rounds):", "",
                  "| setting | first switch s | later switches, median s | max s |",
                  "|---|---:|---:|---:|"]  # fmt: skip
        for setting, median in switch["seconds"].items():
            start = f"{first[setting]:.2f}" if first else "–"
            lines.append(f"| {setting} | {start} | {median:.2f} | {switch['seconds_max'][setting]:.2f} |")
        if "load_avg_at_end" in switch:
            lines += ["", f"1-minute load average as the switches ended: {switch['load_avg_at_end']:.1f} (2 cores; "
                      "above 2, other jobs shared them and the times are upper bounds)."]  # fmt: skip
    device = next(iter(rows.values())).get("device", "cpu")
    machine = "Shared 2-core machine." if device == "cpu" else f"One {device}, float32 with TF32 off."
    lines += ["", f"Command: `{point_runner.command_line('benchmarks/dial_table.py')}`. {machine}"]
    atomic_write(results.with_suffix(".md"), "\n".join(lines) + "\n")
    if has_ppl:
        _plot(rows, results)


def _plot(rows: dict, results: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, pick, marker in (("dial (one artifact)", "dial", "o"), ("dedicated GPTQ", "ded", "s")):
        xs, ys = [], []
        for setting in ("bits=3", "bits=4", "bits=8"):
            row = rows.get(f"dial {setting}") if pick == "dial" else rows.get(DEDICATED[setting])
            if row:
                xs.append(int(setting.split("=")[1]))
                ys.append(row["ppl"])
        if xs:
            ax.plot(xs, ys, marker=marker, label=label)
    ax.set_xlabel("bits per weight (width)")
    ax.set_ylabel("WikiText-2 ppl (ctx 2048, first 40 windows)")
    ax.set_yscale("log")
    ax.set_xticks([3, 4, 8])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(results.with_suffix(".png"), dpi=120)


def main() -> None:
    workdir = str(Path.home() / ".cache" / "compresslm" / "dial-bench")
    options = [("--limit", int, 40), ("--workdir", str, workdir), ("--device", str, "cpu"),
               ("--results", str, str(RESULTS)), ("--recipe", str, "dial"),
               ("--artifact", str, "")]  # fmt: skip
    done = point_runner.table_main(__file__, RESULTS, DEFAULT_POINTS, run_point, options)
    if done and done[0]:
        write_markdown(done[0], Path(done[1].results))


if __name__ == "__main__":
    main()
