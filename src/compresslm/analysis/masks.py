"""Mask stability: do two calibration sets (seeds, sizes, domains) choose the same weights to prune?

A mask that changes a lot with the calibration text is fitted to that text; one that does not is a
property of the model. `mask_stability` prunes two fresh copies of a model with one recipe and
two calibration sets and reports, per layer, the overlap of the pruned sets (intersection over
union), beside the overlap two independent random masks of the same ratio would have by chance.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import torch

from compresslm.data.calibration import CalibrationSet
from compresslm.errors import CompressLMError
from compresslm.models.loaded import LoadedModel
from compresslm.models.loading import load_model
from compresslm.recipe import Recipe, load_recipe
from compresslm.sparse.masks import mask_overlap


def chance_overlap(ratio_a: float, ratio_b: float) -> float:
    """Expected intersection over union of two independent random pruned sets with these ratios."""
    both = ratio_a * ratio_b
    union = ratio_a + ratio_b - both
    return both / union if union > 0 else 1.0


@dataclass
class MaskStability:
    layers: dict[str, dict]  # name -> {"overlap", "chance", "sparsity_a", "sparsity_b"}
    calibrations: list[dict]
    recipe: dict
    summary: dict = field(default_factory=dict)


def compare_masks(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Per-layer overlap of two sets of masks (True = kept) with the same layer names."""
    if set(a) != set(b):
        raise CompressLMError(f"the two mask sets cover different layers: {sorted(set(a) ^ set(b))[:3]}")
    out = {}
    for name in a:
        ratio_a = 1.0 - float(a[name].float().mean())
        ratio_b = 1.0 - float(b[name].float().mean())
        out[name] = {
            "overlap": mask_overlap(a[name], b[name]),
            "chance": chance_overlap(ratio_a, ratio_b),
            "sparsity_a": ratio_a,
            "sparsity_b": ratio_b,
        }
    return out


def mask_stability(
    model: str | os.PathLike | LoadedModel,
    recipe: str | dict | Recipe,
    calibrations: tuple[CalibrationSet, CalibrationSet],
    device: str | None = None,
    show_progress: bool = False,
) -> MaskStability:
    """Prune two copies of `model` with `recipe`, one per calibration set, and compare their masks."""
    from compresslm.engine.sequential import compress

    recipe = load_recipe(recipe)
    if len(calibrations) != 2:
        raise CompressLMError("mask stability compares exactly two calibration sets")
    masks = []
    for calibration in calibrations:
        lm = copy.deepcopy(model) if isinstance(model, LoadedModel) else load_model(model)
        result = compress(lm, recipe, calibration=calibration, device=device, show_progress=show_progress)
        masks.append({name: r.mask for name, r in result.weights.items() if r.mask is not None})
    if not masks[0]:
        raise CompressLMError(f"recipe '{recipe.name}' prunes nothing, so there are no masks to compare")
    layers = compare_masks(*masks)
    overlaps = [v["overlap"] for v in layers.values()]
    summary = {
        "mean_overlap": sum(overlaps) / len(overlaps),
        "min_overlap": min(overlaps),
        "min_layer": min(layers, key=lambda k: layers[k]["overlap"]),
        "mean_chance": sum(v["chance"] for v in layers.values()) / len(layers),
    }
    return MaskStability(layers, [c.protocol for c in calibrations], recipe.to_dict(), summary)
