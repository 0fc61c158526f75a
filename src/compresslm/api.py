"""The Python face of compresslm: load, compress, save, evaluate."""

from __future__ import annotations

import os
from dataclasses import asdict

from compresslm.data.calibration import CalibrationSet
from compresslm.engine.budget import BudgetTarget
from compresslm.engine.sequential import CompressionResult
from compresslm.engine.sequential import compress as _compress_in_place
from compresslm.fileio import check_writable_file
from compresslm.models.assemble import save_compressed
from compresslm.models.loaded import LoadedModel, check_finite
from compresslm.models.loading import load_model
from compresslm.recipe import Recipe, load_recipe


def compress(
    model: str | os.PathLike | LoadedModel,
    recipe: str | dict | Recipe,
    output: str | os.PathLike | None = None,
    *,
    calibration: CalibrationSet | None = None,
    device: str | None = None,
    show_progress: bool = True,
    stats_cache: str | os.PathLike | None = None,
    target: BudgetTarget | None = None,
) -> tuple[LoadedModel, CompressionResult, dict | None]:
    """Compress a model (a source or a LoadedModel, changed in place) and optionally write a `.clm`.

    Returns the compressed model, the compression result (records, per-layer report, protocol) and,
    when `output` is given, the container's measured sizes. `stats_cache`: a directory where recipes
    with `calibration.propagate: original` keep and reuse their calibration statistics.
    `target`: a size to fit; the budget solver turns `recipe` (one quantize stage) into per-layer
    widths first (`result.plan`), and the written file is checked against the target.
    """
    if output is not None:
        check_writable_file(output)  # before any compute: a bad path fails now, not after calibration
    if isinstance(model, LoadedModel):
        lm = model
        check_finite(lm.model, lm.source)  # load_model checks what it loads; an in-memory model is checked here
    else:  # the budget solver's gradient pass runs on the whole model: put it on the device at once
        lm = load_model(model, device=device if target is not None else None)
    source = lm.describe()
    plan = None
    if target is not None:
        plan = target.plan(lm, load_recipe(recipe), show_progress=show_progress)
        recipe = plan.recipe
    result = _compress_in_place(
        lm, recipe, calibration=calibration, device=device, show_progress=show_progress, stats_cache=stats_cache
    )
    result.plan = plan
    lm.compressed = {**result.weights, **result.embeddings}
    summary = None
    if output is not None:
        metadata = {
            "recipe": result.recipe.to_dict(),
            "calibration": result.calibration,
            "source_model": source,
            "layers": [asdict(layer) for layer in result.layers],
            "compression_seconds": result.seconds,
        }
        summary = save_compressed(
            lm, result.weights, output, metadata, dense_dtype=result.recipe.dense_dtype, embeddings=result.embeddings
        )
        if plan is not None:
            target.check(plan, summary)
    return lm, result, summary
