"""Joint SparseGPT + quantization on real layers: where each group's grid should be fitted.

SparseGPT with a grid fits each group's scale and zero point when its column sweep reaches the
group, on the kept weights as they stand then. The group's later columns are still updated after
that (the error of every pruned and rounded weight is spread over the columns to its right), and
pruning moves weights much more than rounding does, so some land outside the range and are
clipped. For five linears of `smollm2-135m` (Hessians from 32 x 512-token C4 windows, seed 0, on
the uncompressed model), the layer output error tr(ΔW H ΔWᵀ) of joint SparseGPT + quantization
(group 64, asymmetric) divided by an unquantized SparseGPT's at the same pattern, for
`fit_on` = `current` (at the group, the default), `final` (on where an unquantized SparseGPT pass
leaves the weights) and `both` (the union of the two ranges).

    .venv/bin/python benchmarks/joint_grid_layer.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from nested_sparse_layer import hessians
from results_store import atomic_write

from compresslm.quant.gptq import output_error
from compresslm.quant.grid import Grid
from compresslm.sparse.masks import SparsityPattern
from compresslm.sparse.prune import sparsegpt
from compresslm.versions import versions

RESULTS = Path(__file__).parent / "results" / "joint_grid_layer"
LAYERS = ["model.layers.3.mlp.gate_proj", "model.layers.10.self_attn.q_proj", "model.layers.20.self_attn.o_proj",
          "model.layers.25.self_attn.o_proj", "model.layers.28.mlp.down_proj"]  # fmt: skip
PATTERNS = ["50%", "70%", "2:4"]
FITS = ("current", "final", "both")


def main() -> None:
    import nested_sparse_layer

    started = time.perf_counter()
    nested_sparse_layer.LAYERS = LAYERS
    weights, hs = hessians()
    rows = []
    for name in LAYERS:
        w, h = weights[name], hs[name]
        for text in PATTERNS:
            pattern = SparsityPattern.parse(text)
            pruned = output_error(w, sparsegpt(w, h, pattern).dequantize(), h)
            for bits in (8, 4):
                grid = Grid(bits, "group", 64, False)
                ratios = {fit: output_error(w, sparsegpt(w, h, pattern, grid, fit_on=fit).dequantize(), h) / pruned
                          for fit in FITS}  # fmt: skip
                rows.append({"layer": name, "pattern": text, "bits": bits, "error_vs_unquantized": ratios})
                print(name, text, bits, {k: round(v, 4) for k, v in ratios.items()}, flush=True)
    payload = {"rows": rows, "seconds": time.perf_counter() - started, "versions": versions()}
    atomic_write(RESULTS.with_suffix(".json"), json.dumps(payload, indent=2) + "\n")
    lines = ["# Joint SparseGPT + quantization: where each group's grid is fitted", "",
             " ".join(__doc__.split("\n\n")[1].split()), "",
             "| layer | pattern | bits | " + " | ".join(f"`{fit}`" for fit in FITS) + " |",
             "|---|---|---:|" + "---:|" * len(FITS)]  # fmt: skip
    for row in rows:
        errors = row["error_vs_unquantized"]
        best = min(errors.values())
        cells = " | ".join(f"**{errors[f]:.4f}**" if errors[f] == best else f"{errors[f]:.4f}" for f in FITS)
        lines.append(f"| {row['layer'].removeprefix('model.layers.')} | {row['pattern']} | {row['bits']} | {cells} |")
    wins = {fit: sum(min(r["error_vs_unquantized"], key=r["error_vs_unquantized"].get) == fit for r in rows)
            for fit in FITS}  # fmt: skip
    v = versions()
    tally = ", ".join(f"`{f}` {n} of {len(rows)}" for f, n in wins.items())
    lines += ["", f"Lowest error per row (bold): {tally}.",
              "", f"Command: `.venv/bin/python benchmarks/joint_grid_layer.py` ({payload['seconds']:.0f} s). "
              f"torch {v['torch']}, transformers {v['transformers']}, compresslm {v['compresslm']}."]  # fmt: skip
    atomic_write(RESULTS.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
