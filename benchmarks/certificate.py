"""Does the compressibility certificate predict what compression loses? Per-layer predicted vs measured error.

`compresslm diagnose`'s predicted RTN error of every linear (computed before compressing) against the
relative output error each layer really has after compression (the container's per-layer report,
measured on its calibration inputs), for RTN and GPTQ at W4 and W3 g64 on the reference model:
Spearman rank correlation with its n, and a scatter plot. Every block is calibrated on the
uncompressed model's inputs (`propagate: original`), as the diagnosis is, so both see the same inputs.

    .venv/bin/python benchmarks/certificate.py [--samples 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from results_store import atomic_write

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "certificate"
RECIPES = ("w4-g64-rtn", "w3-g64-rtn", "w4-g64-gptq", "w3-g64-gptq")


def spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows of 512 tokens (C4)")
    args = parser.parse_args()

    from compresslm.analysis.diagnose import diagnose
    from compresslm.api import compress
    from compresslm.data.calibration import calibration_windows
    from compresslm.models.loading import load_model
    from compresslm.recipe import load_recipe
    from compresslm.versions import versions

    started = time.perf_counter()
    lm = load_model(args.model)
    calibration = calibration_windows(lm.tokenizer, "c4", args.samples, 512, 0)
    diagnosis = diagnose(lm, calibration, (3, 4), 64, fisher_windows=0, show_progress=True)
    predicted = {layer["name"]: layer["predicted_error"] for layer in diagnosis["layers"]}
    rows = {}
    for name in RECIPES:
        recipe = load_recipe(name)
        recipe.calibration.samples, recipe.calibration.propagate = args.samples, "original"
        _, result, _ = compress(load_model(args.model), recipe, calibration=calibration, show_progress=True)
        bits = int(name[1])
        pairs = [(predicted[layer.name][str(bits)], layer.relative_error) for layer in result.layers
                 if layer.relative_error is not None]  # fmt: skip
        rows[name] = {"n": len(pairs), "spearman": spearman(*map(list, zip(*pairs, strict=True))),
                      "pairs": pairs}  # fmt: skip
        print(f"{name}: Spearman {rows[name]['spearman']:.3f} over {len(pairs)} layers", flush=True)
    machine = f"{platform.machine()}, {platform.platform()}"
    out = {"model": args.model, "calibration": calibration.protocol, "rows": rows, "versions": versions(),
           "machine": machine, "seconds": time.perf_counter() - started}  # fmt: skip
    atomic_write(RESULTS.with_suffix(".json"), json.dumps(out, indent=1) + "\n")
    write_markdown(out)


def write_markdown(out: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    for name, row in out["rows"].items():
        xs, ys = zip(*row["pairs"], strict=True)
        ax.scatter(xs, ys, s=12, label=f"{name} (Spearman {row['spearman']:.2f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predicted relative output error (RTN, before compressing)")
    ax.set_ylabel("measured relative output error (after compressing)")
    ax.set_title(f"{out['model']}: the certificate against each layer's measured error", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS.with_suffix(".png"))
    plt.close(fig)
    v = out["versions"]
    lines = [
        f"# Compressibility certificate on `{out['model']}`: predicted vs measured per-layer error",
        "",
        f"Calibration: {out['calibration']['windows']} × {out['calibration']['length']} tokens of "
        f"{out['calibration']['source']}, seed 0; every block calibrated on the uncompressed model's inputs.",
        "Predicted: each weight's RTN rounding error times its input channel's energy, before compressing",
        "(`compresslm diagnose`). Measured: the layer's relative output error ‖(W−Q)X‖²/‖WX‖² after compression.",
        "",
        "| recipe | layers (n) | Spearman rank correlation |",
        "|---|---:|---:|",
        *[f"| {name} | {row['n']} | {row['spearman']:.3f} |" for name, row in out["rows"].items()],
        "",
        "![predicted vs measured](certificate.png)",
        "",
        f"Command: `.venv/bin/python benchmarks/certificate.py`. Machine: {out['machine']}. Versions: compresslm "
        f"{v['compresslm']}, torch {v['torch']}, transformers {v['transformers']}. {out['seconds']:.0f} s.",
    ]
    atomic_write(RESULTS.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
