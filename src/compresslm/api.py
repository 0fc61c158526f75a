"""The Python face of compresslm: load, compress, save, evaluate."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch

from compresslm.data.calibration import CalibrationSet
from compresslm.engine import distributed
from compresslm.engine.budget import BudgetTarget
from compresslm.engine.sequential import CompressionResult
from compresslm.engine.sequential import compress as _compress_in_place
from compresslm.errors import CompressLMError
from compresslm.fileio import check_writable_dir, check_writable_file
from compresslm.models.assemble import StreamingSave, save_compressed
from compresslm.models.layout import discover_layout
from compresslm.models.loaded import LoadedModel, check_finite
from compresslm.models.loading import load_model, save_model
from compresslm.progress import shown
from compresslm.recipe import Recipe, kind_of, load_recipe


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
    stream: bool = False,
) -> tuple[LoadedModel, CompressionResult, dict | None]:
    """Compress a model (a source or a LoadedModel, changed in place) and optionally write a `.clm`.

    Returns the compressed model, the compression result (records, per-layer report, protocol) and,
    when `output` is given, the container's measured sizes. `stats_cache`: a directory where recipes
    with `calibration.propagate: original` keep and reuse their calibration statistics.
    `target`: a size to fit; the budget solver turns `recipe` (one quantize stage) into per-layer
    widths first (`result.plan`), and the written file is checked against the target.
    `stream`: read the model block by block from disk (`load_model(..., lazy=True)`) and write each
    block's records as they are made, so a model larger than memory compresses with one block
    resident; the container is byte for byte the one the resident path writes. The returned model
    is then spent (its blocks are not in memory): load the container to use it.
    """
    if output is not None:
        check_writable_file(output)  # before any compute: a bad path fails now, not after calibration
    if distributed.active():  # one model's calibration split over processes (engine.distributed)
        distributed.check_split(load_recipe(recipe), stream, target is not None)
        stats_cache = None
    if stream:
        return _compress_streaming(model, recipe, output, calibration, device, show_progress, stats_cache, target)
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
    if output is not None and distributed.rank() == 0:  # every rank holds the same records; one writes them
        summary = save_compressed(lm, result.weights, output, _metadata(result, source),
                                  dense_dtype=result.recipe.dense_dtype, embeddings=result.embeddings)  # fmt: skip
        if plan is not None:
            target.check(plan, summary)
    return lm, result, summary


def shrink(
    model: str | os.PathLike | LoadedModel,
    recipe: str | dict | Recipe,
    output: str | os.PathLike | None = None,
    show_progress: bool = True,
) -> tuple[LoadedModel, dict]:
    """Apply a recipe of whole-model stages only (structured pruning `prune_width`/`prune_depth`,
    `rotate`) and optionally save the result as a plain Hugging Face directory.

    Returns the changed model and each stage's facts (what was removed, parameters before and after).
    A recipe with per-layer stages (quantization, pruning) is refused before the model loads: give
    it to `compress`, which applies the whole-model stages first too.
    """
    recipe = load_recipe(recipe)
    other = [stage.type for stage in recipe.stages if kind_of(stage).role != "model"]
    if other or recipe.kv_cache is not None:
        parts = ", ".join(other) or "kv_cache"
        raise CompressLMError(f"recipe '{recipe.name}' has stages that make a container ({parts}); shrink takes "
                              "whole-model stages only (mlp50, drop8, ...): use compress")  # fmt: skip
    if output is not None:
        check_writable_dir(output, "output directory")
    lm = model if isinstance(model, LoadedModel) else load_model(model)
    for stage in recipe.stages:  # a stage that can refuse this model does so before any of them runs
        if callable(getattr(stage, "check_model", None)):
            stage.check_model(lm)
    facts = []
    for stage in recipe.stages:
        with shown(show_progress):
            facts.append({"stage": stage.type, **kind_of(stage).apply(stage, lm)})
        lm.layout = discover_layout(lm.model)
        lm.changed()
    if output is not None:
        save_model(lm, None, output)
    return lm, {"recipe": recipe.to_dict(), "stages": facts}


def _compress_streaming(
    model: str | os.PathLike | LoadedModel,
    recipe: str | dict | Recipe,
    output: str | os.PathLike | None,
    calibration: CalibrationSet | None,
    device: str | None,
    show_progress: bool,
    stats_cache: str | os.PathLike | None,
    target: BudgetTarget | None,
) -> tuple[LoadedModel, CompressionResult, dict]:
    if output is None:
        raise CompressLMError("streaming compression writes a container as it goes: give an output path")
    if target is not None:
        raise CompressLMError("a size target plans on the whole model in memory; it does not stream yet")
    recipe = load_recipe(recipe)
    lm = model if isinstance(model, LoadedModel) else load_model(model, device=device, lazy=True)
    if lm.lazy is None:
        raise CompressLMError(f"{lm.source} does not stream: only safetensors directories and GGUF files do")
    check_block_fits(lm, recipe)
    source = lm.describe()
    sink = StreamingSave(output, recipe.dense_dtype)
    try:
        result = _compress_in_place(lm, recipe, calibration=calibration, device=device, show_progress=show_progress,
                                    stats_cache=stats_cache, sink=sink)  # fmt: skip
    except BaseException:
        sink.abort()
        raise
    summary = sink.finish(lm, result.embeddings, _metadata(result, source))
    return lm, result, summary


def _metadata(result: CompressionResult, source: dict) -> dict:
    """What a container records of how it was made."""
    return {
        "recipe": result.recipe.to_dict(),
        "calibration": result.calibration,
        "source_model": source,
        "layers": [asdict(layer) for layer in result.layers],
        "compression_seconds": result.seconds,
    }


def check_block_fits(lm: LoadedModel, recipe: Recipe) -> None:
    """Refuse, before any work, a streamed compression whose largest block cannot fit in memory.

    A block needs its weights twice (the original layer and its compressed replacement, in the
    compute dtype), and a calibrated recipe the Hessians of its inputs plus the factorization of the
    widest one (about three more copies). The embedding and head are read only outside the block
    steps (embedding the windows, hashing, writing the file), where no block's compression is under
    way, so they do not add to that need. The memory available is the system's (`MemAvailable`), or
    `COMPRESSLM_MAX_MEMORY` where that is set lower (e.g. `12GiB`).
    """
    available = memory_available()
    if available is None:
        return
    element = torch.finfo(lm.dtype).bits // 8
    need = 0
    for block in lm.layout.blocks:
        weights = sum(p.numel() for p in block.module.parameters()) * element
        widest = max((info.in_features for info in block.linears), default=0)
        inputs = {info.in_features for info in block.linears}
        hessians = (sum(n * n for n in inputs) + 3 * widest * widest) * 4 if recipe.needs_calibration else 0
        need = max(need, 2 * weights + hessians)
    if need > available:
        gib = 1024**3
        raise CompressLMError(
            f"the largest block of {lm.source} needs about {need / gib:.1f} GiB to compress (its weights twice"
            + (", its inputs' Hessians and one factorization" if recipe.needs_calibration else "")
            + f"), and {available / gib:.1f} GiB is available; free memory, or set COMPRESSLM_MAX_MEMORY higher "
            "if it is set"
        )


def memory_available() -> int | None:
    """Bytes of memory this process may still use: MemAvailable, capped by COMPRESSLM_MAX_MEMORY (None: unknown)."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    cap = os.environ.get("COMPRESSLM_MAX_MEMORY")
    if cap:
        limit = parse_size(cap, "COMPRESSLM_MAX_MEMORY")
        available = limit if available is None else min(available, limit)
    return available


EXPORT_FORMATS = ("gguf", "compressed-tensors", "hf", "clm-ans")


def export(
    container: str | os.PathLike,
    fmt: str,
    output: str | os.PathLike,
    *,
    requantize: bool = False,
    dtype: str = "float16",
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict:
    """Write a `.clm` container in another runtime's format and return what was written.

    `gguf`: one file for llama.cpp, lossless where a GGUF type holds the grid (otherwise refused, or
    re-rounded with `requantize`, the added error measured; `formats.gguf_export`); `container` may also
    be an uncompressed model (a source `load_model` reads), written with its weights in `dtype` (the
    float file llama.cpp's own quantizer starts from). `hf`: a
    transformers directory of dequantized weights in `dtype`. `compressed-tensors`: the packed format
    llm-compressor writes and vLLM and transformers load. `clm-ans`: the container again, its codes
    ANS-coded (smaller; it loads to the same records bit for bit). An existing target is refused unless
    `overwrite`; the target appears complete or not at all.
    """
    from compresslm.formats.container import is_container, read_header

    if fmt not in EXPORT_FORMATS:
        raise CompressLMError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    target = Path(output).expanduser()
    if target.exists() and not overwrite:
        raise CompressLMError(f"{output} exists; remove it or pass --force to replace it")
    if not Path(container).expanduser().is_file() or not is_container(container):
        if fmt != "gguf" or Path(container).expanduser().is_file():
            raise CompressLMError(f"{container} is not a compresslm container (.clm); compress a model first")
        return _float_gguf(container, target, dtype, show_progress)
    if fmt == "clm-ans":
        from compresslm.formats.ans import require_constriction
        from compresslm.formats.container import rewrite_container

        require_constriction()
        check_writable_file(target)
        return {"path": str(target), "format": fmt, **rewrite_container(container, target, entropy=True)}
    if fmt == "gguf":
        from compresslm.formats.gguf_export import export_gguf

        check_writable_file(target)
        return export_gguf(container, target, requantize=requantize, show_progress=show_progress).to_dict()
    from compresslm.fileio import check_writable_dir
    from compresslm.formats.hf_export import DTYPES, export_hf
    from compresslm.models.assemble import transposed_linears

    if dtype not in DTYPES:
        raise CompressLMError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    check_writable_dir(target.parent)
    header, _ = read_header(container)
    if fmt == "hf":
        return export_hf(container, target, dtype, transposed_linears(header), show_progress=show_progress)
    from compresslm.formats.ct_export import export_compressed_tensors

    return export_compressed_tensors(container, target, dtype, transposed_linears(header), show_progress=show_progress)


def _float_gguf(source: str | os.PathLike, target: Path, dtype: str, show_progress: bool) -> dict:
    """An uncompressed model as a GGUF of `dtype` weights: written as a container without records, then
    exported like any other (the same names, metadata and tokenizer)."""
    import tempfile

    from compresslm.formats.gguf_export import export_gguf
    from compresslm.recipe.core import DENSE_DTYPES

    if dtype not in DENSE_DTYPES:
        raise CompressLMError(f"unknown dtype {dtype!r}; choose one of {', '.join(DENSE_DTYPES)}")
    check_writable_file(target)
    lm = load_model(source)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".float-gguf-") as tmp:
        path = Path(tmp) / "float.clm"
        save_compressed(lm, {}, path, dense_dtype=dtype)
        del lm
        return export_gguf(path, target, show_progress=show_progress).to_dict()


def parse_size(text: str, what: str = "size") -> int:
    """'60MB', '57.2MiB', '1.5GB', '60000000' -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    value = text.strip().upper()
    number = value.rstrip("KMGIB")
    unit = value[len(number) :]
    try:
        if unit not in units:
            raise ValueError
        return int(float(number) * units[unit])
    except ValueError:
        raise CompressLMError(f"cannot read {what} {text!r}; use e.g. 60MB, 57.5MiB or 60000000") from None
