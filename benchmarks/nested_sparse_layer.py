"""Nested sparsity on real layers: what one order and one set of values can reach against SparseGPT.

Four linears of `smollm2-135m` (different blocks and roles), each with its input Hessian from 32
x 512-token C4 calibration windows (seed 0) on the uncompressed model. For each, the layer
output error tr(ΔW H ΔWᵀ) at 20 to 80 % sparsity, divided by a dedicated SparseGPT's at that
ratio (float values, block 128):

* `wanda order`: the dial's order without updates (Wanda's score, weights as they are);
* `nested L / P`: `sparse.nested.nested_sparsegpt` with levels L and priorities P, values on an
  8-bit group-64 grid, as the `dial` preset stores them (its own levels and priorities first).

    .venv/bin/python benchmarks/nested_sparse_layer.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from results_store import atomic_write

from compresslm.quant.gptq import output_error
from compresslm.quant.grid import Grid
from compresslm.recipe import preset
from compresslm.sparse.masks import SparsityPattern
from compresslm.sparse.nested import nested_sparsegpt, order_mask
from compresslm.sparse.prune import scores, sparsegpt
from compresslm.versions import versions

RESULTS = Path(__file__).parent / "results" / "nested_sparse_layer"
LAYERS = ["model.layers.3.mlp.gate_proj", "model.layers.10.self_attn.q_proj", "model.layers.10.mlp.down_proj",
          "model.layers.20.self_attn.o_proj"]  # fmt: skip
RATIOS = (0.2, 0.4, 0.5, 0.6, 0.7, 0.8)
_DIAL = preset("dial").stages[0]
CASES = [
    (tuple(_DIAL.dial_sparsity), tuple(_DIAL.dial_sparsity_priorities)),
    ((0.5, 0.7), (1.0, 0.5)),
    ((0.5, 0.7), (1.0, 1.0)),
    ((0.5, 0.7), (0.5, 1.0)),
    ((0.7,), (1.0,)),
]


def hessians(windows: int = 32, length: int = 512) -> tuple[dict, dict]:
    """Each chosen layer's weight and input Hessian (2/n XᵀX) on the uncompressed model."""
    from compresslm.data.calibration import calibration_windows
    from compresslm.models.loading import load_model

    lm = load_model("smollm2-135m")
    batch = calibration_windows(lm.tokenizer, "c4", windows, length, 0).windows
    sums = {name: None for name in LAYERS}
    rows = {name: 0 for name in LAYERS}

    def hook(name):
        def accumulate(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            sums[name] = x.T @ x if sums[name] is None else sums[name] + x.T @ x
            rows[name] += x.shape[0]

        return accumulate

    handles = [lm.model.get_submodule(name).register_forward_hook(hook(name)) for name in LAYERS]
    with torch.no_grad():
        for i in range(0, windows, 8):
            lm.model.model(batch[i : i + 8])  # the decoder only: the head's output is not needed
    for handle in handles:
        handle.remove()
    weights = {name: lm.model.get_submodule(name).weight.detach().float().clone() for name in LAYERS}
    return weights, {name: 2 * sums[name] / rows[name] for name in LAYERS}


def main() -> None:
    started = time.perf_counter()
    weights, hs = hessians()
    rows = []
    for name in LAYERS:
        w, h = weights[name], hs[name]
        dedicated = {s: output_error(w, sparsegpt(w, h, SparsityPattern(ratio=s)).dequantize(), h) for s in RATIOS}
        in_f = w.shape[1]
        order = scores("wanda", w, h).argsort(dim=1, descending=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(in_f).expand(*w.shape))
        ratios = {s: output_error(w, w * (rank < round((1 - s) * in_f)), h) / dedicated[s] for s in RATIOS}
        rows.append({"layer": name, "case": "wanda order", "error_vs_sparsegpt": ratios})
        for levels, priorities in CASES:
            plane = nested_sparsegpt(w, h, levels, priorities, Grid(8, "group", 64))
            ratios = {s: output_error(w, plane.dequantize() * order_mask(plane, s), h) / dedicated[s] for s in RATIOS}
            rows.append({"layer": name, "case": f"nested {list(levels)} / {list(priorities)}",
                         "error_vs_sparsegpt": ratios})  # fmt: skip
    payload = {"rows": rows, "seconds": time.perf_counter() - started, "versions": versions()}
    atomic_write(RESULTS.with_suffix(".json"), json.dumps(payload, indent=2) + "\n")
    lines = ["# Nested sparsity on real layers: layer error against a dedicated SparseGPT", "",
             " ".join(__doc__.split("\n\n")[1].split()), "",
             "- `wanda order`: the dial's order without updates (Wanda's score, weights as they are);",
             "- `nested L / P`: `nested_sparsegpt` with levels L and priorities P, values on an 8-bit group-64 "
             "grid as the `dial` preset stores them (the preset's own levels and priorities first).", "",
             "| layer | order and values | " + " | ".join(f"{int(s * 100)} %" for s in RATIOS) + " |",
             "|---|---|" + "---:|" * len(RATIOS)]  # fmt: skip
    for row in rows:
        cells = " | ".join(f"{row['error_vs_sparsegpt'][s]:.2f}x" for s in RATIOS)
        lines.append(f"| {row['layer'].removeprefix('model.layers.')} | {row['case']} | {cells} |")
    v = versions()
    lines += ["", "A single level (`nested [0.7]`) reproduces SparseGPT at that ratio (1.00x, the 8-bit grid apart). "
              "One order cannot serve every ratio as well as SparseGPT serves one: weighting a ratio up brings "
              "it near 1x and pushes the others away. Against the fixed order, the updated values cut the excess "
              "error over SparseGPT by half or more at 50 to 70 % with the `dial` preset's levels "
              "(less at 80 %, weighted 0.2). Below the lowest level the values tuned for 50 % and up are far "
              "worse than the fixed order: the dial keeps the fixed order there.", "",
              f"Command: `.venv/bin/python benchmarks/nested_sparse_layer.py` ({payload['seconds']:.0f} s). "
              f"torch {v['torch']}, transformers {v['transformers']}, compresslm {v['compresslm']}."]  # fmt: skip
    atomic_write(RESULTS.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
