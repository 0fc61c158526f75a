"""Training for compressibility on the reference model: does it beat post-hoc compression?

Every variant trains the same steps on the same C4 windows with the same distillation teacher
(the uncompressed model); then the checkpoints are compressed post hoc and evaluated under the
benchmark protocol (WikiText-2 test, GPTQ rows, ctx 2048, first 40 windows). Points, each in its
own subprocess, saved before the next starts (rerunning skips finished ones; a killed training run
resumes from its checkpoint):

* `train <preset>`: `compresslm.train` with a preset (finetune = the control) into `--workdir`;
  `train sparsegpt-2:4-ft`: SparseGPT 2:4 first, then `nm-2:4` on its weights and masks, the
  original model teaching.
* `fp <run>`: ppl of a run's float weights (`base` = the untrained model).
* `qat <run>`: ppl of a QAT run's own container (weights on their learned grid; `learned-widths`:
  each layer at the width the rate term chose); `qat random-precision w4`: the randomized-precision
  run's container at one width, on the steps it learned for that width.
* `ptq <run> <recipe>`: post-training compression of a run's float weights, written, reloaded, evaluated.

    .venv/bin/python benchmarks/train_table.py [--steps 100] [--points ...] [--workdir DIR]
    .venv/bin/python benchmarks/train_table.py --runs qat-w3 base   # one run's points, in order

Each run's loss log (CSV, PNG) is copied to `results/train_table_logs/`. A run's checkpoint lives
in `--workdir`, outside the repository: measure every point of a run in the session that trained
it (`--runs` lists them: its training, then what reads the checkpoint).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import point_runner
from results_store import atomic_write, load_rows

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "train_table"
RUNS = ["finetune", "qat-w4", "qat-w3", "qat-w2", "random-precision", "nm-2:4", "cast-2:4", "sparsegpt-2:4-ft",
        "gmp-50%", "learned-widths"]  # fmt: skip
PLANNED_AT_4_6 = "w4-g64-gptq-awq@4.6"  # the best W4 PTQ recipe, at learned-widths' size
# runs that start from a post-hoc compressed model (its container, dequantized) instead of the original,
# with the original as the distillation teacher: run -> (training preset, recipe of the starting point)
STARTS = {"sparsegpt-2:4-ft": ("nm-2:4", "2:4-sparsegpt")}
# sparsity-aware runs: run -> (the sparsity its checkpoint has, how it chose its masks)
SPARSE_RUNS = {"nm-2:4": ("2:4", "fixed magnitude masks"), "cast-2:4": ("2:4", "masks re-chosen every step"),
               "sparsegpt-2:4-ft": ("2:4", "SparseGPT's 2:4 model fine-tuned on its masks"),
               "gmp-50%": ("50%", "gradual magnitude pruning, cubic")}  # fmt: skip


def matrix_point(run: str, recipe: str) -> str:
    """The matrix cell for `run` under `recipe`: a sparse run's GPTQ widths hold its zeros (plain GPTQ
    would write into them by error feedback and store the layer dense), every other cell as named."""
    if run in SPARSE_RUNS and recipe.endswith("-gptq"):
        return f"ptq {run} {recipe}-keepzeros"
    return f"ptq {run} {recipe}"


def sparse_quantized(run: str, pattern: str, bits: int) -> str:
    """The point that makes `run` sparse and W`bits` g64: the original pruned to `pattern` and quantized
    in one SparseGPT + GPTQ sweep, a sparse run quantized by GPTQ with its own zeros held."""
    if run == "base":
        return f"ptq base {pattern}-sparsegpt+w{bits}-g64-gptq"
    return matrix_point(run, f"w{bits}-g64-gptq")


SPARSE_QUANT_BITS = (4, 3, 2)  # the widths of the sparse-and-quantized table
PTQ_RECIPES = ("w4-g64-gptq", "w3-g64-gptq", "w2-g64-gptq", "50%-sparsegpt", "2:4-sparsegpt")
DEFAULT_POINTS = list(dict.fromkeys([  # in order of priority, each once
    *(f"train {run}" for run in RUNS),
    *(f"fp {run}" for run in ("base", *RUNS)),
    "qat qat-w4", "qat qat-w3", "qat qat-w2", "qat learned-widths",
    *(f"qat random-precision w{b}" for b in (4, 3, 8, 6)),
    *(f"ptq {run} {recipe}" for run in ("base", "finetune")
      for recipe in PTQ_RECIPES),
    *(f"ptq random-precision w{b}-g64-{m}" for b in (4, 3) for m in ("rtn", "gptq")),
    "ptq gmp-50% 50%-sparsegpt", "ptq nm-2:4 2:4-sparsegpt", "ptq cast-2:4 2:4-sparsegpt",
    # sparse and quantized: the original's joint sweep, the sparse runs with their zeros held
    *(sparse_quantized("base", p, b) for b in (4, 3) for p in ("2:4", "50%")),
    *(sparse_quantized(run, p, b) for b in (4, 3) for run, (p, _) in SPARSE_RUNS.items()),
    # the rest of the matrix: every trained checkpoint at every post-hoc setting
    *(matrix_point(run, recipe) for run in RUNS[1:] for recipe in PTQ_RECIPES),
    *(sparse_quantized("base", p, 2) for p in ("2:4", "50%")),  # W2 beside the sparse runs' W2 cells
]))  # fmt: skip


def _run_dir(workdir: Path, run: str) -> Path:
    return workdir / run.replace("%", "pct").replace(":", "of")


def _source(workdir: Path, run: str) -> str:
    if run == "base":
        return "smollm2-135m"
    model = _run_dir(workdir, run) / "model"
    if not model.exists():
        raise SystemExit(f"{model} is missing: run the point 'train {run}' first (same --workdir)")
    return str(model)


def run_point(name: str, args: argparse.Namespace) -> dict:
    import torch

    from compresslm.eval.perplexity import perplexity
    from compresslm.models.loading import load_model

    workdir = Path(args.workdir)
    kind, rest = name.split(" ", 1)
    where = point_runner.use_device(args.device)
    if kind == "train":
        from compresslm.train.trainer import train

        started = time.perf_counter()
        lm = load_model("smollm2-135m", device=args.device)
        preset, teacher, extra = rest, None, {}
        if rest in STARTS:  # compress first; train the container's weights, the original teaching
            from compresslm.api import compress

            preset, recipe = STARTS[rest]
            start = _run_dir(workdir, rest) / "start.clm"
            if not start.exists():
                compress(load_model("smollm2-135m"), recipe, start, device=args.device, show_progress=False)
            teacher, lm = lm, load_model(start, device=args.device)
            extra = {"start": recipe, "start_seconds": time.perf_counter() - started}
        trained = time.perf_counter()
        summary = train(lm, preset, args.steps, _run_dir(workdir, rest), show_progress=False, teacher=teacher)
        seconds = time.perf_counter() - trained
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"point": name, **summary, **extra, "train_seconds": seconds, "torch_threads": torch.get_num_threads(),
                "peak_rss_bytes": peak, **where}  # fmt: skip
    if kind in ("fp", "qat"):
        run, _, width = rest.partition(" ")  # `qat random-precision w4`: one width of a multi-width run
        own = "model-learned-widths.clm" if run == "learned-widths" else f"model-{width or 'w' + run[-1]}.clm"
        path = _run_dir(workdir, run) / own if kind == "qat" else _source(workdir, run)
        lm = load_model(path, device=args.device)
        ppl = perplexity(lm, "wikitext2", ctx=2048, limit=args.limit, show_progress=False)
        return {"point": name, "ppl": ppl.ppl, "eval_protocol": ppl.protocol, **where}
    run, recipe = rest.split(" ", 1)
    with tempfile.TemporaryDirectory() as tmp:
        row = point_runner.run_point(recipe, _source(workdir, run), args.limit, Path(tmp), args.device)
        return {**row, "point": name}


def write_markdown(rows: dict, steps: int, results: Path = RESULTS) -> None:
    def ppl(point: str) -> str:
        return f"{rows[point]['ppl']:.3f}" if point in rows else "–"

    lines = [
        "# Training for compressibility on `smollm2-135m`",
        "",
        f"Each run: {steps} steps of the same C4 windows, KL distillation from the uncompressed model; then "
        "post-hoc compression where named. Eval: WikiText-2 test, GPTQ rows, ctx 2048, first 40 windows.",
        "",
        *threads_line(rows),
        "| run | float weights | own container | w4 g64 GPTQ | w3 g64 GPTQ | w2 g64 GPTQ | 50 % SparseGPT "
        "| 2:4 SparseGPT |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in ["base", *RUNS]:
        own = ppl(f"qat {run}") if f"qat {run}" in DEFAULT_POINTS else ""
        cells = " | ".join(ppl(matrix_point(run, r)) for r in PTQ_RECIPES)
        lines.append(f"| {run} | {ppl(f'fp {run}')} | {own} | {cells} |")
    dense = [f"{run} at {r[:2].upper()} {ppl(f'ptq {run} {r}')}" for run in SPARSE_RUNS for r in PTQ_RECIPES[:3]
             if f"ptq {run} {r}" in rows]  # fmt: skip
    lines += ["", "The sparse runs' GPTQ cells hold their zeros (`-keepzeros`, as in the next table). Without it "
              "GPTQ's error feedback writes into the zeros and stores the layers dense"
              + (f": {', '.join(dense)}." if dense else ".")]  # fmt: skip
    lines += sparse_quantized_table(rows)
    own = [f"w{b} {ppl(f'qat random-precision w{b}')}" for b in (8, 6, 4, 3) if f"qat random-precision w{b}" in rows]
    if own:
        lines += ["", "Random-precision checkpoint, its own container at each width: " + ", ".join(own) + "."]
    rp = [f"{p.split(' ', 2)[2]} {ppl(p)}" for p in rows if p.startswith("ptq random-precision")]
    if rp:
        lines += ["", "Random-precision checkpoint compressed post hoc: " + ", ".join(rp) + "."]
    lines += answers(rows) + noise_floor(rows)
    lines += learned_widths_lines(rows)
    trained = [r for r in rows.values() if r["point"].startswith("train")]
    if trained:
        times = ", ".join(f"{r['point'][6:]} {r['train_seconds'] / 60:.0f} min" for r in trained)
        device = trained[0].get("device", "cpu")
        lines += ["", f"Training time: {times} ({'shared 2-core CPU' if device == 'cpu' else device})."]
    lines += ["", point_runner.commands(rows, point_runner.command_line("benchmarks/train_table.py"))]
    atomic_write(results.with_suffix(".md"), "\n".join(lines) + "\n")


def sparse_quantized_table(rows: dict) -> list[str]:
    """Sparse and quantized: the original model pruned and quantized in one joint SparseGPT + GPTQ
    sweep, beside each sparsity-aware run quantized by GPTQ with its own zeros held (`-keepzeros`)."""
    lines, sizes = [], {}  # sizes: bits per linear weight as written, by pattern and width
    for run, pattern in (("base", "2:4"), ("base", "50%"), *((run, p) for run, (p, _) in SPARSE_RUNS.items())):
        if run == "base":
            label, points = f"original, {pattern} SparseGPT + GPTQ (one sweep)", [f"ptq base {pattern}-sparsegpt"]
        else:
            label, points = f"{run}, zeros held", [f"fp {run}"]
        points += [sparse_quantized(run, pattern, b) for b in SPARSE_QUANT_BITS]
        if any(point in rows for point in points[1:]):
            cells = " | ".join(f"{rows[p]['ppl']:.3f}" if p in rows else "–" for p in points)
            lines.append(f"| {label} | {cells} |")
        for bits, point in zip(SPARSE_QUANT_BITS, points[1:], strict=True):
            if "linear_bits_per_param" in rows.get(point, {}):
                sizes.setdefault(f"{pattern.replace('%', ' %')} + W{bits}", rows[point]["linear_bits_per_param"])
    if not lines:
        return []
    widths = "".join(f" + W{b} g64 GPTQ |" for b in SPARSE_QUANT_BITS)
    head = ["", f"| sparse model | sparse, float |{widths}", "|---|---:|" + "---:|" * len(SPARSE_QUANT_BITS)]
    dense = [f"W{b} {rows[p]['linear_bits_per_param']:.2f}" for b in SPARSE_QUANT_BITS
             if "linear_bits_per_param" in rows.get(p := f"ptq base w{b}-g64-gptq", {})]  # fmt: skip
    note = ", ".join(f"{name} {value:.2f}" for name, value in sizes.items())
    note += f" (dense {', '.join(dense)})" if dense else ""
    return head + lines + ([] if not sizes else ["", f"Bits per linear weight as written: {note}."])


def learned_widths_lines(rows: dict) -> list[str]:
    """What the rate term chose, its container's ppl, and the post-training mixed-precision plan at the
    same size from the quantization table (the solver's widths, AWQ + GPTQ), which it has to beat."""
    from collections import Counter

    learned = rows.get("train learned-widths")
    if not learned:
        return []
    bits = learned["linear_bits_per_weight"]
    counts = Counter(learned["widths"].values())
    per_width = ", ".join(f"{b} bits {counts[b]}" for b in sorted(counts))
    line = (f"learned-widths: the rate term (λ = {learned['recipe']['rate_weight']:g}) chose {bits:.3f} bits per "
            f"linear weight (layers per width: {per_width})")  # fmt: skip
    if "qat learned-widths" in rows:
        line += f"; its container: ppl {rows['qat learned-widths']['ppl']:.3f}"
    planned = load_rows(HERE / "results" / "quant_table.json").get(PLANNED_AT_4_6)
    if planned:
        line += (f"; the post-training plan at {planned['linear_bits_per_param']:.3f} bits ({PLANNED_AT_4_6}, "
                 f"quant_table.md): {planned['ppl']:.3f}")  # fmt: skip
    return ["", line + "."]


def threads_line(rows: dict) -> list[str]:
    """How many torch threads each point ran with (the thread count moves GPTQ's codes). A training row
    from before rows recorded it takes the count of the evaluations its own command (same queue, same
    environment) measured, if they agree; rows from before commands were recorded count as one command."""
    by_command: dict[str | None, set] = {}
    for row in rows.values():
        if "eval_protocol" in row:
            by_command.setdefault(row.get("command"), set()).add(row["eval_protocol"].get("torch_threads"))
    points: dict[int | None, list[str]] = {}
    for name, row in rows.items():
        threads = row.get("torch_threads", row.get("eval_protocol", {}).get("torch_threads"))
        if threads is None and len(by_command.get(row.get("command"), ())) == 1:
            threads = next(iter(by_command[row.get("command")]))
        points.setdefault(threads, []).append(name)
    if not points or set(points) == {None}:
        return []
    common = max((n for n in points if n is not None), key=lambda n: len(points[n]))
    others = "; ".join(f"{n if n is not None else 'not recorded'}: {', '.join(points[n])}"
                       for n in points if n != common)  # fmt: skip
    return [f"Torch threads per point (compression, evaluation, training): {common}"
            + (f", except {others}." if others else "."), ""]  # fmt: skip


def answers(rows: dict) -> list[str]:
    """The issue's three questions, answered from whichever of their points are measured."""

    def value(point: str) -> float | None:
        return rows[point]["ppl"] if point in rows else None

    def versus(ours: float, theirs: float) -> str:
        return f"{ours:.3f} vs {theirs:.3f} ({(ours / theirs - 1) * 100:+.1f} %)"

    lines = []
    base, control = value("fp base"), value("fp finetune")
    for bits in (4, 3, 2):
        qat, ptq = value(f"qat qat-w{bits}"), value(f"ptq base w{bits}-g64-gptq")
        if qat is None or ptq is None:
            continue
        line = f"- W{bits} g64: QAT's own container vs post-hoc GPTQ of the original model {versus(qat, ptq)}"
        if base is not None and base < qat < ptq:
            line += f"; QAT recovers {(ptq - qat) / (ptq - base) * 100:.0f} % of GPTQ's loss over float {base:.3f}"
        ctrl = value(f"ptq finetune w{bits}-g64-gptq")
        line += f"; GPTQ of the fine-tuned control: {ctrl:.3f}" if ctrl is not None else ""
        own_ptq = value(f"ptq qat-w{bits} w{bits}-g64-gptq")  # QAT's float weights re-quantized by GPTQ
        line += f"; GPTQ of the QAT checkpoint's float weights: {own_ptq:.3f}" if own_ptq is not None else ""
        lines.append(line + ".")
    for bits in (4, 3):
        qat = value(f"qat qat-w{bits}")
        for point, how in ((f"qat random-precision w{bits}", "its own container (learned steps)"),
                           (f"ptq random-precision w{bits}-g64-gptq", "its float weights, GPTQ post hoc")):  # fmt: skip
            rp = value(point)
            if rp is not None and qat is not None:
                close = "within" if rp <= qat * 1.05 else "not within"
                lines.append(f"- W{bits}: one randomized-precision checkpoint, {how}, vs a dedicated QAT run's own "
                             f"container {versus(rp, qat)}: {close} 5 %.")  # fmt: skip
    for run, (pattern, how) in SPARSE_RUNS.items():
        sparse, sparsegpt = value(f"fp {run}"), value(f"ptq base {pattern}-sparsegpt")
        if sparse is None or sparsegpt is None:
            continue
        line = f"- {pattern.replace('%', ' %')} ({run}, {how}): sparsity-aware training vs post-hoc "
        line += "SparseGPT of the original model " + versus(sparse, sparsegpt)
        if base is not None and base < sparse < sparsegpt:
            line += f"; training recovers {(sparsegpt - sparse) / (sparsegpt - base) * 100:.0f} % of SparseGPT's loss"
        ctrl = value(f"ptq finetune {pattern}-sparsegpt")
        line += f"; SparseGPT of the fine-tuned control: {ctrl:.3f}" if ctrl is not None else ""
        for bits in SPARSE_QUANT_BITS:  # sparse and quantized: zeros held vs the joint sweep
            held, joint = value(sparse_quantized(run, pattern, bits)), value(sparse_quantized("base", pattern, bits))
            if held is not None and joint is not None:
                line += f"; + W{bits} g64 GPTQ, zeros held, vs SparseGPT + GPTQ of the original {versus(held, joint)}"
        lines.append(line + ".")
    if not lines:
        return []
    head = ["", "## The questions", ""]
    if base is not None and control is not None:
        head += [f"Float weights: the original {base:.3f}, the fine-tuned control {control:.3f}.", ""]
    return head + lines


def noise_floor(rows: dict) -> list[str]:
    """The post-hoc rows of the original model beside the same recipe in the quantization and pruning
    tables: the same code path and protocol, so any difference is float rounding (thread count)."""
    import json

    earlier = {}
    for table in ("quant_table", "prune_table"):
        earlier.update({name: (table, row) for name, row in load_rows(HERE / "results" / f"{table}.json").items()})
    pairs = []
    for point, row in rows.items():
        recipe = point.removeprefix("ptq base ")
        if point.startswith("ptq base ") and recipe in earlier:
            table, other = earlier[recipe]
            threads = (row["eval_protocol"].get("torch_threads"), other["eval_protocol"].get("torch_threads"))
            counts = [f"{n} thread{'s' if n != 1 else ''}" for n in threads]
            pairs.append(f"{recipe} {row['ppl']:.3f} here ({counts[0]}) vs {other['ppl']:.3f} in {table}.md "
                         f"({counts[1]})")  # fmt: skip
    if not pairs:
        return []
    layer = HERE / "results" / "thread_determinism.json"
    measured = ""
    if layer.exists():
        codes = json.loads(layer.read_text())
        measured = f" (`thread_determinism.md`: {codes['codes_differing']:,} of {codes['codes']:,} GPTQ codes on one "
        measured += "synthetic layer)"
    return [
        "",
        "Noise floor: the same recipe on the original model, measured by this table and by an earlier one: "
        + "; ".join(pairs)
        + ". Same code path and protocol: with another thread count float sums round differently and some "
        f"codes change{measured}, and the ppl moves with them; differences of this size between rows are not results.",
    ]


def points_of_runs(runs: list[str]) -> list[str]:
    """The default points that train or read the named runs (`base`: the untrained model), in order."""
    return [point for point in DEFAULT_POINTS if point.split(" ")[1] in runs]


def main() -> None:
    if "--runs" in sys.argv:  # shorthand for --points: every point of the named runs
        start = sys.argv.index("--runs")
        end = next((i for i in range(start + 1, len(sys.argv)) if sys.argv[i].startswith("--")), len(sys.argv))
        sys.argv[start:end] = ["--points", *points_of_runs(sys.argv[start + 1 : end])]
    workdir = str(Path.home() / ".cache" / "compresslm" / "train-bench")
    options = [("--steps", int, 100), ("--limit", int, 40), ("--workdir", str, workdir), ("--device", str, "cpu"),
               ("--results", str, str(RESULTS))]  # fmt: skip
    done = point_runner.table_main(__file__, RESULTS, DEFAULT_POINTS, run_point, options)
    if done and done[0]:
        write_markdown(done[0], done[1].steps, Path(done[1].results))
        keep_loss_logs(done[0], Path(done[1].results))


def keep_loss_logs(rows: dict, results: Path) -> None:
    """Copy each trained run's loss log (CSV) beside the table while its work folder exists, and draw
    its PNG anew from the copy (so every kept plot has the trainer's current layout)."""
    import csv

    from compresslm.train.trainer import plot_loss_log

    logs = results.parent / f"{results.name}_logs"
    for point, row in rows.items():
        if not point.startswith("train "):
            continue
        source, kept = Path(row.get("log", "")), logs / f"{_run_dir(Path(), point.removeprefix('train ')).name}.csv"
        if source.is_file():
            logs.mkdir(exist_ok=True)
            shutil.copyfile(source, kept)
        if kept.is_file():
            with kept.open(newline="") as handle:
                plot_loss_log(list(csv.DictReader(handle)), kept.with_suffix(".png"))


if __name__ == "__main__":
    main()
