"""Recompression drift: compress, dequantize, compress again, k times, and watch quality and weights.

A compressed model is often compressed again (a quantized checkpoint re-quantized by another tool,
a dial setting exported and re-rounded). Cycle 1 compresses the source; cycle k compresses the
dequantized model cycle k−1 wrote (its container, loaded with float weights) with the next recipe
of the list, taken in turn, so one recipe measures how close it is to a fixed point and two
measure the damage of alternating grids. Each cycle is written, reloaded and scored like any point,
and its linear weights are compared with the previous cycle's, the first cycle's and the source's
(relative Frobenius distance over all compressed linears).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from compresslm.errors import CompressLMError
from compresslm.models.loaded import LoadedModel
from compresslm.recipe import Recipe, load_recipe


def _linear_weights(lm: LoadedModel, names: list[str]) -> dict[str, torch.Tensor]:
    """The float [out, in] weight of each named linear (dequantized when compressed)."""
    out = {}
    for name in names:
        module = lm.model.get_submodule(name)
        if callable(getattr(module, "dequantized", None)):
            out[name] = module.dequantized(torch.float32).detach().clone()
        else:
            weight = module.weight.detach().float()
            out[name] = (weight.T if type(module).__name__ == "Conv1D" else weight).clone()
    return out


def _drift(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor]) -> float:
    """sqrt(Σ‖W_new − W_old‖²) / sqrt(Σ‖W_old‖²) over the linears both hold."""
    diff = sum(float((new[n].double() - old[n].double()).pow(2).sum()) for n in new if n in old)
    base = sum(float(old[n].double().pow(2).sum()) for n in new if n in old)
    return (diff / base) ** 0.5 if base > 0 else 0.0


def recompression_drift(
    source: str | os.PathLike,
    recipes: list[str | dict | Recipe],
    cycles: int,
    workdir: str | os.PathLike,
    corpus: str = "wikitext2",
    ctx: int = 2048,
    limit: int | None = 8,
    calibration_samples: int | None = None,
    show_progress: bool = True,
) -> list[dict]:
    """One row per cycle: its recipe, perplexity, bits/param and the weights' drift (see the module docstring)."""
    from compresslm.api import compress
    from compresslm.eval.perplexity import perplexity
    from compresslm.models.loading import load_model

    if cycles < 1:
        raise CompressLMError(f"cycles={cycles}: give at least one cycle")
    loaded = []
    for recipe in recipes or []:
        recipe = load_recipe(recipe)
        if calibration_samples is not None:
            recipe.calibration.samples = calibration_samples
        loaded.append(recipe.validate())
    if not loaded:
        raise CompressLMError("give at least one recipe")
    workdir = Path(workdir).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    lm = load_model(source)
    names = [info.name for info in lm.layout.linears()]
    original = _linear_weights(lm, names)
    rows, first, previous = [], None, original
    for cycle in range(1, cycles + 1):
        recipe = loaded[(cycle - 1) % len(loaded)]
        path = workdir / f"cycle{cycle}.clm"
        started = time.perf_counter()
        _, _, summary = compress(lm, recipe, path, show_progress=show_progress)
        reloaded = load_model(path)
        result = perplexity(reloaded, corpus, ctx=ctx, limit=limit, show_progress=show_progress)
        weights = _linear_weights(reloaded, names)
        first = first or weights
        rows.append({
            "cycle": cycle, "recipe": recipe.name or recipe.to_dict(), "container": str(path), "ppl": result.ppl,
            "bits_per_param": summary["bits_per_param"], "drift_from_previous": _drift(weights, previous),
            "drift_from_first": _drift(weights, first), "drift_from_source": _drift(weights, original),
            "seconds": time.perf_counter() - started, "eval_protocol": result.protocol,
        })  # fmt: skip
        previous = weights
        del reloaded
        lm = load_model(path, float_weights=True)  # the next cycle starts from this one's dequantized weights
    return rows
