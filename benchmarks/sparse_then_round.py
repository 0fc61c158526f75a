"""Does 8-bit rounding cost SparseGPT at 70 % sparsity, or does the joint sweep?

The full sweep measured SparseGPT 70 % with 8-bit GPTQ in one joint sweep at ppl 358.1-389.4
(grids fitted as the sweep reaches each group / on both ranges), 3-12 % above SparseGPT 70 % with
float16 values (347.6). This script takes that float16 container from the sweep's container folder,
rounds its kept weights to 8 bits (RTN, group 64, asymmetric, the mask unchanged) and evaluates it
under the same protocol (WikiText-2 test, ctx 2048, first 40 windows, KL to the float32 model), so
the cost of 8-bit values alone is measured next to the sweep's rows, which are read from its database.

    .venv/bin/python benchmarks/sparse_then_round.py [--containers /work/sweep-full/containers] [--bits 8]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import time
from pathlib import Path

import torch
from results_store import atomic_write

from compresslm.eval.distance import distance, reference_logits
from compresslm.models.assemble import load_compressed
from compresslm.models.loading import load_model
from compresslm.quant.grid import Grid
from compresslm.quant.rtn import rtn
from compresslm.runtime.linear import CompressedLinear
from compresslm.sparse.prune import apply_mask
from compresslm.versions import versions

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "sparse_then_round"
SWEEP_DB = HERE / "results" / "sweep_full" / "results.sqlite"
SUPERSEDED = HERE / "results" / "sweep_full" / "superseded.json"


def round_kept_weights(lm, bits: int) -> int:
    """RTN every compressed linear's kept weights to `bits` (group 64, asymmetric); pruned stay zero."""
    count = 0
    for module in lm.model.modules():
        if isinstance(module, CompressedLinear):
            record = module.compressed
            weight = record.dequantize().float()
            mask = record.mask if record.mask is not None else weight != 0
            rounded = apply_mask(rtn(weight.masked_fill(~mask, 0.0), Grid(bits, "group", 64, False)), mask, record.nm)
            module.compressed, module.weight = rounded, rounded.dequantize(module.weight.dtype)
            count += 1
    return count


def how(result: dict) -> str:
    """How a sweep row's sparse 8-bit weights were made, from its recipe."""
    stages = result["recipe"]["stages"]
    nested = next((st for st in stages if st.get("nested_widths")), None)
    if nested is not None:
        if not nested.get("separate_sparsity"):
            return "dial: the shared nested-sparse plane"
        fit = nested.get("separate_sparsity_fit")
        return f"dial: own plane, {fit}" if fit else "dial: own plane, joint sweep (fit not recorded in the recipe)"
    prune = next(st for st in stages if st["type"] == "prune")
    if len(stages) == 1:
        return "SparseGPT, float16 values"
    fit = prune.get("grid_fit", "current")
    return "SparseGPT, then GPTQ on its mask" if fit == "after" else f"joint SparseGPT + GPTQ, grids fitted: {fit}"


def sweep_rows(labels: list[str]) -> list[dict]:
    """The sweep's rows (database, then the superseded file) whose label starts with one of `labels`."""
    found = []
    db = sqlite3.connect(SWEEP_DB)
    query = "SELECT label, result, finished_at FROM points WHERE status='done' ORDER BY finished_at"
    for label, result, finished in db.execute(query):
        found.append((label, json.loads(result), finished, "sweep database"))
    superseded = json.loads(SUPERSEDED.read_text()) if SUPERSEDED.exists() else {"rows": []}
    for r in superseded["rows"]:
        result = json.loads(r["result"]) if isinstance(r["result"], str) else r["result"]
        found.append((r["label"], result, r["finished_at"], "sweep, superseded.json: " + r["why"]))
    found.sort(key=lambda f: f[2])
    rows = []
    for label, result, finished, source in found:
        if any(label.startswith(p) for p in labels):
            note = " [superseded.json]" if "superseded" in source else ""
            rows.append({"label": label, "how": how(result) + note, "ppl": result["ppl"],
                         "kld_mean": result["kld_mean"], "finished_at": finished, "source": source})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--containers", default="/work/sweep-full/containers")
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--ratio", type=int, default=70)
    parser.add_argument("--refresh", action="store_true",
                        help="keep the measured row from the JSON; re-read the sweep's rows only")  # fmt: skip
    args = parser.parse_args()
    name = RESULTS.with_name(f"{RESULTS.name}_{args.ratio}_w{args.bits}")
    if args.refresh:
        payload = json.loads(name.with_suffix(".json").read_text())
        measured = payload["rows"][0]
    else:
        started = time.perf_counter()
        base = load_model("smollm2-135m")
        reference = reference_logits(base, "wikitext2", ctx=2048, limit=40, show_progress=False)
        del base
        lm = load_compressed(Path(args.containers) / f"{args.ratio}_-sparsegpt.clm")
        layers = round_kept_weights(lm, args.bits)
        result = distance(lm, reference, "wikitext2", show_progress=False)
        measured = {"label": f"{args.ratio}%-sparsegpt (float16) then RTN W{args.bits} g64 on its mask",
                    "how": "SparseGPT, float16 values, then RTN", "ppl": result.ppl, "kld_mean": result.kld_mean,
                    "top1_agreement": result.top1_agreement, "layers_rounded": layers,
                    "source": "this script"}  # fmt: skip
        payload = {"protocol": result.protocol, "seconds": time.perf_counter() - started,
                   "threads": torch.get_num_threads(), "versions": versions()}  # fmt: skip
    payload["rows"] = [measured, *sweep_rows([f"{args.ratio}%-sparsegpt", f"dial-8-{args.ratio}%"])]
    rows = payload["rows"]
    atomic_write(name.with_suffix(".json"), json.dumps(payload, indent=2) + "\n")
    fp16 = next((r["ppl"] for r in rows if r["label"] == f"{args.ratio}%-sparsegpt"), None)
    lines = [f"# SparseGPT {args.ratio} % at {args.bits} bits: rounding alone vs the joint sweep", "",
             " ".join(__doc__.split("\n\n")[1].split()), "",
             f"Command: `.venv/bin/python benchmarks/sparse_then_round.py --ratio {args.ratio} --bits {args.bits}`; "
             f"{payload['threads']} threads, torch {payload['versions']['torch']}, {payload['seconds']:.0f} s. "
             "The sweep's rows are read from its database (and `superseded.json`), oldest first.", "",
             "| point | how the 8-bit sparse weights were made | finished | ppl | / float16 SparseGPT | KL |",
             "|---|---|---|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        ratio = f"{r['ppl'] / fp16:.3f}" if fp16 else "-"
        when = r.get("finished_at", "") or ""
        lines.append(f"| {r['label']} | {r['how']} | {when[:16]} | {r['ppl']:.3f} | {ratio} | {r['kld_mean']:.4f} |")
    lines += [
        "",
        "Dial artifacts made before the recipe recorded how its pruned planes are quantized "
        "(`separate_sparsity_fit`) ran a joint sweep: the superseded one fitted each group's grid when the "
        "sweep reached it, the later one on both ranges (`benchmarks/results/sweep_full/README.md`).",
    ]
    atomic_write(name.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
