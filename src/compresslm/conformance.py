"""The conformance matrix: every model family compresslm claims, against every method family.

Each cell builds a tiny randomly initialised model of the family from transformers' own config
class (`models.tiny`), runs one method on it with a few calibration windows and checks what a
user relies on:

* the container round trip: the model reloaded from its `.clm` computes the same logits, bit for
  bit, as the model compressed in memory;
* every scale fold (AWQ, SmoothQuant) was verified numerically (see `engine.smoothing`);
* a sanity bound: at 8 bits the logits stay close to the float model's (relative error below
  `W8_BOUND`); pruned, KV-quantized, dial and trained models give finite logits and perplexity.

A cell is `ok`, `unsupported` (the family cannot be mapped or folded: the message says what is
missing, before any compute) or `fails` (a bug). `python -m compresslm.conformance` prints the
matrix as a markdown table; tests/test_conformance.py runs every cell in CI, and README's list of
supported families is that table.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from compresslm.errors import UnsupportedArchitectureError
from compresslm.models.loaded import LoadedModel
from compresslm.models.tiny import CONFORMANCE_FAMILIES, byte_tokenizer, tiny_model

# method family -> the recipe its cell runs (8-bit where the sanity bound applies)
METHODS = {
    "RTN": "w8-g16-rtn",
    "GPTQ": "w8-g16-gptq",
    "AWQ": "w8-g16-awq",
    "SmoothQuant": "w8a8-smoothquant",
    "Wanda": "50%-wanda",
    "SparseGPT": "50%-sparsegpt",
    "KV cache": "w8-g16-rtn+kv4-g16",
    "dial": "dial-g16",
    "low-rank": "w4-g16-gptq+lqer4",
    "factorization": "20%-whitened",
    "rotation": "rot+w8-g16-gptq",
    "structured": "drop1+mlp50+heads50+w8-g16-rtn",
    "training": "qat-w4",
}
W8_BOUND = 0.1  # relative logits error of a W8 model against the float model
# Cells known not to work, with a fragment of the refusal each must give (before any compute).
KNOWN_UNSUPPORTED = {
    ("gpt2", "training"): "training supports nn.Linear layers",
    ("gemma2", "KV cache"): "sliding-window caches are not implemented",
    ("gemma3", "KV cache"): "sliding-window caches are not implemented",
    ("gpt2", "rotation"): "nn.Linear layers and rotary positions only",
    ("opt", "rotation"): "nn.Linear layers and rotary positions only",
    ("gemma2", "rotation"): "does not commute with the rotation",
    ("gemma3", "rotation"): "does not commute with the rotation",
    ("phi3", "rotation"): "separate q, k, v, o",
    ("olmo2", "rotation"): "does not commute with the rotation",
    ("gpt_neox", "rotation"): "separate q, k, v, o",
    ("falcon", "rotation"): "separate q, k, v, o",
    ("stablelm", "rotation"): "not an RMS norm",
    ("gpt2", "structured"): "not Conv1D",
    ("opt", "structured"): "does not follow its pruned config",
    ("phi3", "structured"): "separate input (gate/up or fc1)",
    ("gpt_neox", "structured"): "separate q, k, v and o",
    ("falcon", "structured"): "separate q, k, v and o",
    ("stablelm", "structured"): "does not follow its pruned config",
}
_BOUNDED = ("RTN", "GPTQ", "AWQ", "SmoothQuant", "rotation")


@dataclass
class Cell:
    family: str
    method: str
    status: str  # "ok", "unsupported" or "fails"
    detail: str
    seconds: float


def _probe_ids() -> torch.Tensor:
    return torch.randint(3, 259, (1, 32), generator=torch.Generator().manual_seed(1))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_probe_ids()).logits.float()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _recipe(name: str):
    from compresslm.recipe import load_recipe

    recipe = load_recipe(name)
    recipe.calibration.samples, recipe.calibration.length, recipe.calibration.source = 4, 32, "wikitext2"
    for stage in recipe.stages:  # whole-model stages that draw windows of their own
        if hasattr(stage, "samples") and hasattr(stage, "length"):
            stage.samples, stage.length, stage.source = 2, 32, "wikitext2"
    return recipe


def run_cell(family: str, method: str, workdir: str | Path | None = None) -> Cell:
    """Run one family x method cell; never raises for the cell's own failure (it is the result)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        try:
            detail = _check(family, method, Path(tmp))
            status = "ok"
        except UnsupportedArchitectureError as exc:
            status, detail = "unsupported", str(exc)
        except Exception as exc:  # the matrix reports every failure as a cell, with its reason
            status, detail = "fails", f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
    return Cell(family, method, status, detail, time.perf_counter() - started)


def _check(family: str, method: str, tmp: Path) -> str:
    from compresslm.api import compress
    from compresslm.models.assemble import load_compressed

    tokenizer = byte_tokenizer()
    model = tiny_model(family)
    reference = _logits(model)
    lm = LoadedModel.from_module(model, tokenizer, name=f"tiny-{family}")
    if method == "training":
        return _check_training(lm, tmp)
    path = tmp / "model.clm"
    _, result, _ = compress(lm, _recipe(METHODS[method]), path, show_progress=False)
    reloaded = load_compressed(path)
    compressed_logits = _logits(lm.model)
    if not torch.equal(_logits(reloaded.model), compressed_logits):
        raise AssertionError("the reloaded container computes other logits than the model compressed in memory")
    notes = []
    if method in _BOUNDED:
        error = _relative(compressed_logits, reference)
        if error > W8_BOUND:
            raise AssertionError(f"W8 logits are {error:.3f} away from the float model's (bound {W8_BOUND})")
        notes.append(f"W8 logits error {error:.4f}")
    elif not torch.isfinite(compressed_logits).all():
        raise AssertionError("non-finite logits")
    folds = [f for f in result.info.get("scale_folds", []) if f["fold_into"]]
    if method in ("AWQ", "SmoothQuant"):
        if any(f["verified"] is None and f["alpha"] != 0.0 for f in folds):  # α = 0: nothing was scaled
            raise AssertionError("a scale fold was not verified")
        offset = sum(f["norm_offset"] == 1.0 for f in folds)
        total = len(result.info.get("scale_folds", []))
        into = f", {offset} into x̂·(1 + w) norms" if offset else ""
        notes.append(f"{len(folds)}/{total} input groups folded{into}")
    if method == "KV cache":
        from compresslm.eval.kv_quality import kv_perplexity

        kv = kv_perplexity(reloaded, reloaded.kv_cache.config, "wikitext2", ctx=64, limit=1, chunk=16,
                           show_progress=False)  # fmt: skip
        if not math.isfinite(kv["ppl"]) or not kv["kv_bytes"] < kv["kv_bytes_fp16"]:
            raise AssertionError(f"KV-cache evaluation gave ppl {kv['ppl']}, {kv['kv_bytes']} bytes")
        notes.append(f"KV4 cache {kv['kv_bytes']} of {kv['kv_bytes_fp16']} bytes")
    if method == "structured":
        facts = result.info["model_transforms"]
        notes.append(f"{facts['prune_depth']['layers']['to']} of 2 blocks, MLP {facts['prune_width']['mlp']['to']} of "
                     f"128, heads {facts['prune_width']['heads']['to']} of 4; plain config reloads")  # fmt: skip
    if method == "dial":
        from compresslm.dial import set_budget

        set_budget(reloaded, 4, 0.5)
        if not torch.isfinite(_logits(reloaded.model)).all():
            raise AssertionError("non-finite logits at 4 bits, 50 %")
        notes.append("switched to 4 bits, 50 %")
    return "; ".join(notes) or "round trip exact"


def _check_training(lm: LoadedModel, tmp: Path) -> str:
    from compresslm.models.assemble import load_compressed
    from compresslm.train.trainer import train, train_recipe

    recipe = train_recipe(METHODS["training"])
    recipe.batch_size, recipe.seq_len, recipe.data, recipe.lr = 1, 32, "wikitext2", 1e-4
    summary = train(lm, recipe, 1, tmp / "run", show_progress=False)
    reloaded = load_compressed(summary["container"])
    if not torch.isfinite(_logits(reloaded.model)).all():
        raise AssertionError("the QAT container gives non-finite logits")
    return f"one QAT step, loss {summary['first_loss']:.2g}; its W4 container reloads"


def run_matrix(families=CONFORMANCE_FAMILIES, methods=tuple(METHODS), log=None) -> list[Cell]:
    cells = []
    for family in families:
        for method in methods:
            cell = run_cell(family, method)
            cells.append(cell)
            if log is not None:
                log(f"{family:<10} {method:<12} {cell.status:<12} {cell.seconds:5.1f} s  {cell.detail[:120]}")
    return cells


def markdown(cells: list[Cell]) -> str:
    """The matrix as a table: a mark per cell, and the reasons below it."""
    methods = list(dict.fromkeys(c.method for c in cells))
    families = list(dict.fromkeys(c.family for c in cells))
    by = {(c.family, c.method): c for c in cells}
    marks = {"ok": "✓", "unsupported": "–", "fails": "✗"}
    lines = ["| family | " + " | ".join(methods) + " |", "|---|" + ":---:|" * len(methods)]
    for family in families:
        lines.append(f"| {family} | " + " | ".join(marks[by[family, m].status] for m in methods) + " |")
    notes = [f"- {c.family} × {c.method}: {c.status}: {c.detail}" for c in cells if c.status != "ok"]
    return "\n".join(lines + (["", *notes] if notes else [])) + "\n"


if __name__ == "__main__":
    torch.set_num_threads(1)
    matrix = run_matrix(log=lambda line: print(line, file=sys.stderr, flush=True))
    print(markdown(matrix))
    sys.exit(1 if any(c.status == "fails" for c in matrix) else 0)
