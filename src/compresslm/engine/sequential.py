"""The sequential calibration engine: compress one decoder block at a time.

1. Run the model on the calibration windows until the first block and keep that block's inputs
   (positional arguments and keyword arguments such as rotary embeddings and masks).
2. For block i: run it on its inputs with hooks that accumulate each target linear's statistics
   (the input Hessian XᵀX), turn every target weight into a CompressedWeight with the recipe's
   algorithm, swap in `CompressedLinear` modules, then run the *compressed* block to produce
   block i+1's inputs, so later blocks calibrate against the errors of earlier ones.

With `calibration.propagate: original` the statistics pass's own outputs (the uncompressed
block's) feed block i+1 instead: one forward pass per block instead of two, and statistics that
depend on the model and the windows alone, so they can be cached on disk (`engine.stats_cache`)
and reused by every later recipe without running the model at all.

Only one block's activations live in memory at a time. The engine knows nothing of GPTQ's maths;
it calls the pure algorithm functions in `compresslm.quant`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
from torch import nn

from compresslm.compressed import CompressedWeight
from compresslm.data.calibration import CalibrationSet, calibration_windows
from compresslm.engine import distributed
from compresslm.engine.allocation import outlier_share, owl_ratios
from compresslm.engine.blocks import BlockWalk, collect_statistics
from compresslm.engine.head import calibrates_head, quantize_head, target_module
from compresslm.engine.linear_stages import compress_weight, describe_stages
from compresslm.engine.smoothing import ScaleFold, fold_input_scales
from compresslm.engine.statistics import BlockStatistics
from compresslm.engine.stats_cache import StatisticsCache, cache_key
from compresslm.errors import CompressLMError
from compresslm.kv.cache import check_kv_support
from compresslm.models.forward import Batch, Carried, capture_first_block_inputs, run_block
from compresslm.models.layout import BlockInfo, LinearInfo, discover_layout, embedding_share
from compresslm.models.loaded import DTYPES, LoadedModel, model_fingerprint
from compresslm.progress import shown
from compresslm.quant.gptq import output_error
from compresslm.quant.rtn import rtn
from compresslm.recipe import PruneStage, QuantizeEmbeddingStage, QuantizeStage, Recipe, kind_of, load_recipe
from compresslm.runtime.linear import CompressedLinear, dense_weight, replace_module
from compresslm.sparse.masks import SparsityPattern
from compresslm.versions import versions


@dataclass
class LayerReport:
    name: str
    role: str
    method: str
    grid: str
    relative_error: float | None  # ‖(W−Q)X‖² / ‖WX‖² on the calibration inputs (None without calibration)
    seconds: float
    meta: dict = field(default_factory=dict)


@dataclass
class CompressionResult:
    """What compression produced: the records by module path, a per-layer report and the protocol."""

    weights: dict[str, CompressedWeight]
    layers: list[LayerReport]
    recipe: Recipe
    calibration: dict | None
    seconds: float
    info: dict = field(default_factory=dict)
    embeddings: dict[str, CompressedWeight] = field(default_factory=dict)
    plan: object | None = None  # the budget solver's BudgetPlan when a size target chose the widths


def _stages_for(recipe: Recipe, info: LinearInfo) -> list:
    """The linear's stages in recipe order: the last matching quantize and prune stage (built in, combined
    by `compress_weight`), then every other registered linear stage that targets it."""
    chosen: dict[str, int] = {}
    extra = []
    for index, stage in enumerate(recipe.stages):
        kind = kind_of(stage)
        if kind.role != "linear" or not stage.applies_to(info.role, info.name):
            continue
        if kind.apply is None:
            chosen[kind.name] = index
        else:
            extra.append(index)
    return [recipe.stages[index] for index in sorted(chosen.values())] + [recipe.stages[index] for index in extra]


def _apply_stages(
    name: str, weight: torch.Tensor, stages: list, hessian: torch.Tensor | None, built_in: CompressedWeight | None
) -> CompressedWeight:
    """Registered linear stages after the built-in ones, each on the record the stages before it made."""
    record = built_in
    for stage in stages:
        kind = kind_of(stage)
        if kind.apply is None:
            continue
        if getattr(stage, "needs_calibration", False) and hessian is None:
            raise CompressLMError(f"{name}: {stage.type} needs calibration statistics")
        record = kind.apply(stage, weight, record, hessian)
        if not isinstance(record, CompressedWeight) or record.shape != tuple(weight.shape):
            raise CompressLMError(
                f"{name}: stage {stage.type} did not return a CompressedWeight of {tuple(weight.shape)}"
            )
    return record


def _quant_stage(stages: list) -> QuantizeStage | None:
    return next((s for s in stages if isinstance(s, QuantizeStage)), None)


def _prune_stage(stages: list) -> PruneStage | None:
    return next((s for s in stages if isinstance(s, PruneStage)), None)


def _relative_error(original: torch.Tensor, compressed: torch.Tensor, hessian: torch.Tensor) -> float:
    """‖(W−Q)X‖² / ‖WX‖² over the calibration inputs."""
    total = output_error(original, torch.zeros_like(original), hessian)
    return output_error(original, compressed, hessian) / total if total > 0 else 0.0


def _round_dense(module: nn.Module, dtype_name: str, skip: set[str] = frozenset(), prefix: str = "") -> None:
    """Round a module's tensors that stay dense to their storage dtype, so containers reload bit-exactly.

    `skip` names submodules (by their path in the model; `module` is at `prefix`) whose weights will
    be compressed (their biases are still rounded). Tensors still on the meta device are left alone.
    """
    dtype = DTYPES[dtype_name]
    with torch.no_grad():
        for name, param in module.named_parameters():
            module_name = name.rpartition(".")[0]
            if prefix:
                module_name = f"{prefix}.{module_name}" if module_name else prefix
            if (module_name in skip and name.endswith(".weight")) or param.is_meta:
                continue
            param.copy_(param.to(dtype).to(param.dtype))


def _prepare_block(
    lm: LoadedModel,
    block: BlockInfo,
    stats: BlockStatistics | None,
    block_targets: list[tuple[LinearInfo, list]],
    recipe: Recipe,
    folds: list[ScaleFold],
    probe: list[Batch],
    probe_output: list[Batch],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Fold AWQ/SmoothQuant input scales where asked, each verified on the `probe` window (whose output
    through the unfolded block is `probe_output`); return each linear's Hessian and input scales."""
    if stats is None:
        return {}, {}
    stages = {info.name: _quant_stage(s) for info, s in block_targets if _quant_stage(s) is not None}
    if not any(stage.rescales_inputs for stage in stages.values()):
        return {name: stats.hessian(name) for name in stats.owner}, {}
    hessians, input_scales, block_folds = fold_input_scales(
        lm.model,
        block,
        stats,
        stages,
        lambda module: _round_dense(module, recipe.dense_dtype),
        block_output=(lambda: run_block(block.module, probe)[0].args[0]) if probe else None,
        reference=probe_output[0].args[0] if probe_output else None,
    )
    folds.extend(block_folds)
    return hessians, input_scales


def _static_activation_scale(
    info: LinearInfo, stage: QuantizeStage, stats: BlockStatistics | None, input_scales: dict[str, torch.Tensor]
) -> torch.Tensor | None:
    """The per-tensor activation step from the calibration max |x| (after any folded input scaling)."""
    if stage.act_granularity != "tensor":
        return None
    if stats is None:
        raise CompressLMError(f"{info.name}: static activation ranges need calibration")
    channel_max = stats.stats[stats.owner[info.name]].act_max
    scale = input_scales.get(info.name)
    if scale is not None:
        channel_max = channel_max / scale
    return channel_max.max() / ((1 << (stage.act_bits - 1)) - 1)


def _replace(lm: LoadedModel, info: LinearInfo, record: CompressedWeight) -> CompressedLinear:
    """Swap the compressed layer in. A streamed model keeps it packed (dequantized at each forward of the
    calibration pass), so a block's finished layers do not hold float copies while the rest compress."""
    bias = getattr(info.module, "bias", None)
    new = CompressedLinear(record, bias, dtype=info.module.weight.dtype, float_weight=lm.lazy is None)
    new = new.to(info.module.weight.device)
    replace_module(lm.model, info.name, new)
    return new


class RecordSink(Protocol):
    """Where a streamed compression hands each record as it is made, instead of keeping it
    (`models.assemble.StreamingSave` writes them to a container and journals each finished block).

    `run` identifies the compression (source, recipe, windows, versions): `resume(run)` returns what
    a killed run with the same identity had carried past its last finished block, or None.
    """

    def linear(self, name: str, record: CompressedWeight, module: nn.Module) -> None: ...

    def block(self, block: BlockInfo, carried: Carried, run: str) -> None: ...

    def resume(self, run: str) -> Carried | None: ...


def compress(
    lm: LoadedModel,
    recipe: str | dict | Recipe,
    *,
    calibration: CalibrationSet | None = None,
    device: str | None = None,
    show_progress: bool = True,
    stats_cache: str | os.PathLike | None = None,
    sink: RecordSink | None = None,
) -> CompressionResult:
    """Compress `lm` in place according to `recipe` and return the records and a per-layer report.

    The model's targeted linear layers become `CompressedLinear` modules; tensors that stay dense
    are rounded to the recipe's `dense_dtype`. Calibration windows are drawn from the recipe's
    settings unless `calibration` is given; given windows are also used by recipes that need none
    (RTN), to report each layer's reconstruction error. `stats_cache` (a directory) keeps the
    per-block statistics of recipes with `calibration.propagate: original` for reuse by later ones.

    With a `sink`, each linear's record goes to it as soon as it is made and each finished block is
    handed to it, and the result keeps no record: with a lazily loaded model (`load_model(...,
    lazy=True)`) one block's weights and records are resident at a time. The model is then spent:
    its blocks are left on the meta device.
    """
    recipe = load_recipe(recipe)
    if distributed.active():
        distributed.check_recipe(recipe)
        if sink is not None or stats_cache is not None:
            raise CompressLMError("a compression split over processes neither streams nor caches statistics yet")
    started = time.perf_counter()
    source = lm.describe() if sink is not None else None  # a spent model has no identity of its own afterwards
    transforms = {}
    for stage in recipe.stages:  # a whole-model stage that can refuse this model does so before any of them runs
        if kind_of(stage).role == "model" and callable(getattr(stage, "check_model", None)):
            stage.check_model(lm)
    for stage in recipe.stages:  # whole-model transforms (registered role "model") before anything else
        kind = kind_of(stage)
        if kind.role == "model":  # each sees the model the one before it left
            with shown(show_progress):
                transforms[stage.type] = kind.apply(stage, lm)
            lm.layout = discover_layout(lm.model)
            lm.changed()
    targets: dict[str, tuple[LinearInfo, list]] = {}
    for info in lm.layout.linears():
        stages = _stages_for(recipe, info)
        if stages:
            targets[info.name] = (info, stages)
        for stage in stages:  # a stage that can refuse a layer (a rank it cannot hold) does so before any compute
            if callable(getattr(stage, "check_layer", None)):
                stage.check_layer(info.name, (info.out_features, info.in_features))
    embedding_stages = [s for s in recipe.stages if isinstance(s, QuantizeEmbeddingStage)]
    share = embedding_share(lm.model, lm.layout) if embedding_stages else 0.0
    dense_embedding = [s for s in embedding_stages if not s.applies(share)]
    embedding_stages = [s for s in embedding_stages if s.applies(share)]
    tied = lm.layout.tied_lm_head
    head_stages = [s for s in embedding_stages if any(calibrates_head(s, t, tied) for t in s.targets)]
    if not targets and not embedding_stages and recipe.kv_cache is None:
        raise CompressLMError("the recipe targets no linear layer of this model (check 'targets' and 'ignore')")
    if recipe.kv_cache is not None:
        check_kv_support(lm.model)
    _round_dense(lm.model, recipe.dense_dtype, set(targets))
    if lm.lazy is not None:  # blocks still on disk are rounded as they are read
        lm.lazy.prepare = lambda module, path: _round_dense(module, recipe.dense_dtype, set(targets), path)

    if lm.lazy is not None and embedding_stages:  # changed in memory: no longer re-read from disk when used
        lm.lazy.keep(lm.model)
    weights: dict[str, CompressedWeight] = {}
    layers: list[LayerReport] = []
    folds: list[ScaleFold] = []
    embeddings = _quantize_embeddings(lm, embedding_stages, weights, layers)
    calib_protocol = None
    lm.model.eval()
    run_device = torch.device(device) if device else lm.device

    n_blocks = len(lm.layout.blocks)
    batches: list[Batch] = []
    probe: list[Batch] = []
    cache: StatisticsCache | None = None
    on_original = reused = False
    with torch.inference_mode(False), torch.no_grad():
        if recipe.needs_calibration or calibration is not None:  # given windows also buy error reports
            settings = recipe.calibration
            on_original = settings.propagate == "original"
            if calibration is None:
                calibration = calibration_windows(
                    lm.tokenizer, settings.source, settings.samples, settings.length, settings.seed
                )
            calib_protocol = {**calibration.protocol, "propagate": settings.propagate}
            if lm.lazy is None:
                lm.model.to(run_device)
            if on_original and stats_cache is not None:
                fingerprint = lm.fingerprint() if lm.lazy is not None else model_fingerprint(lm.model)
                key = cache_key(fingerprint, calibration.protocol["windows_sha256"],
                                settings.batch_size, str(run_device))  # fmt: skip
                cache = StatisticsCache(stats_cache, key, n_blocks)
                reused = calib_protocol["statistics_reused"] = cache.complete()
            if distributed.active():
                calib_protocol["processes"] = distributed.world()
            if not reused or head_stages:  # under torch.distributed, this rank's share of the windows
                # (a head fitted by GPTQ needs the final hidden states, which no cache holds: the walk runs)
                batches = capture_first_block_inputs(lm, distributed.shard(calibration.windows), settings.batch_size,
                                                     run_device)  # fmt: skip
            if any(isinstance(s, QuantizeStage) and s.rescales_inputs for s in recipe.stages):
                # one window through the original blocks, on which every scale fold is verified
                probe = capture_first_block_inputs(lm, calibration.windows[:1], 1, run_device)
        run = _run_identity(source, recipe, calib_protocol, run_device) if sink is not None else ""
        carried = sink.resume(run) if sink is not None else None
        if sink is not None:
            for name in list(weights):  # an untied lm_head's record
                sink.linear(name, weights.pop(name), lm.model.get_submodule(name))
        if carried is not None:  # a killed run's blocks are in the file already: go on from the next one
            batches, probe = _with_hidden(batches, carried.inputs), _with_hidden(probe, carried.probe)
            layers[:] = [LayerReport(**layer) for layer in carried.layers]
            folds[:] = [ScaleFold(**fold) for fold in carried.folds]

        # a dial with separate widths calibrates its shared chain on a second stream, propagated at the
        # chain's narrowest width, while the main stream follows the narrowest width overall; each
        # separately pruned ratio calibrates on a stream of its own, propagated at that ratio
        dial_stages = [s for _, ss in targets.values() for s in ss if isinstance(s, QuantizeStage) and s.nested_widths]
        chains = {min(s.nested_widths) for s in dial_stages if s.separate_widths}
        ratios = sorted({r for s in dial_stages for r in s.separate_sparsity})
        streams: dict[str | float, list[Batch]] = {}
        if batches and not on_original:
            streams = {key: list(batches) for key in (["chain"] if chains else []) + ratios}
        if carried is not None:
            streams = {key: _with_hidden(stream, carried.streams[str(key)]) for key, stream in streams.items()}
        if streams:
            calib_protocol["dial_streams"] = {"separate widths": "narrowest width", "chain": sorted(chains),
                                              "pruned ratios": ratios}  # fmt: skip
        allocation = _allocate_sparsity(lm, targets, batches, run_device, show_progress, on_original, cache)
        if cache is not None and cache.complete() and not head_stages:
            batches = []  # the OWL pass filled the cache: the blocks need no more forward passes

        def checkpoint(step) -> None:  # after a block's records and its outputs: journal what the next one needs
            hidden = {str(key): [b.args[0] for b in stream] for key, stream in streams.items()}
            sink.block(step.block, Carried(step.index + 1, [b.args[0] for b in walk.inputs],
                                           [b.args[0] for b in probe], hidden, [asdict(x) for x in layers],
                                           [asdict(f) for f in folds]), run)  # fmt: skip

        walk = BlockWalk(lm, batches, run_device, propagate=recipe.calibration.propagate, cache=cache,
                         label="compress", show_progress=show_progress, start=carried.next_block if carried else 0,
                         after_block=checkpoint if sink is not None else None)  # fmt: skip
        for step in walk:
            block, stats = step.block, step.stats
            block_targets = [targets[i.name] for i in block.linears if i.name in targets]
            following_probe = run_block(block.module, probe) if probe else []  # the original block's output
            hessians, input_scales = _prepare_block(lm, block, stats, block_targets, recipe, folds, probe,
                                                    following_probe)  # fmt: skip
            probe = following_probe
            stream_hessians: dict[str | float, dict[str, torch.Tensor]] = {}
            for key, stream in streams.items():
                stream_stats, _ = collect_statistics(block, stream, run_device)
                stream_hessians[key] = {info.name: stream_stats.hessian(info.name) for info, _ in block_targets}
            for info, stages in block_targets:
                pattern = _pattern_for(_prune_stage(stages), block.name, allocation)
                streams_of = {key: hessians_of[info.name] for key, hessians_of in stream_hessians.items()}
                record, layer = _compress_linear(lm, info, stages, hessians.get(info.name), pattern, streams_of,
                                                 stats, input_scales)  # fmt: skip
                if sink is None:
                    weights[info.name] = record
                else:
                    sink.linear(info.name, record, lm.model.get_submodule(info.name))
                layers.append(layer)
                walk.layer_done()
            for key in streams:  # the same block with its dial layers at the stream's setting
                dial_layers = [m for m in block.module.modules() if isinstance(m, CompressedLinear) and m.nested]
                for module in dial_layers:
                    _dial_to_stream(module, key)
                streams[key] = run_block(block.module, streams[key])
                for module in dial_layers:  # back at the narrowest width, for the main stream
                    module.dial(min(module.nested.dial.widths))

        if head_stages:  # one head, quantized by the first stage that targets it
            _quantize_head(lm, head_stages[0], walk.inputs, run_device, weights, embeddings, layers, sink)
    for module in lm.model.modules():  # dial layers end at their widest width, as the container stores them
        if isinstance(module, CompressedLinear) and module.nested is not None:
            module.dial(module.nested.bits)
    lm.layout = discover_layout(lm.model)
    lm.kv_cache = recipe.kv_cache
    lm.changed()
    # float sums round differently with another thread count, and some codes change with them
    info = {"versions": versions(), "device": str(run_device), "torch_threads": torch.get_num_threads(),
            "model": source or lm.describe()}  # fmt: skip
    if carried is not None:
        info["resumed_at_block"] = carried.next_block
    if transforms:
        info["model_transforms"] = transforms
    if folds:
        info["scale_folds"] = [asdict(fold) for fold in folds]
    if cache is not None:
        info["statistics_cache"] = str(cache.dir)
    if dense_embedding:
        info["embedding_left_dense"] = (f"the embedding and untied head hold {share:.1%} of the parameters, "
                                        f"under the {dense_embedding[0].min_share:.0%} at which the recipe "
                                        "quantizes them")  # fmt: skip
    if allocation:
        info["sparsity_allocation"] = {"method": "owl", "block_ratios": {k: p.ratio for k, p in allocation.items()}}
    if any(s.act_bits for s in recipe.stages if isinstance(s, QuantizeStage)):
        info["activation_quantization"] = "simulated (quantize-dequantize in float; no int8 kernel used)"
    seconds = time.perf_counter() - started
    return CompressionResult(weights, layers, recipe, calib_protocol, seconds, info, embeddings)


def _run_identity(source: dict, recipe: Recipe, calibration: dict | None, device: torch.device) -> str:
    """What a resumed compression must share with the one it continues to write the same file."""
    identity = {"model": source["sha256"], "recipe": recipe.to_dict(), "calibration": calibration,
                "versions": {k: v for k, v in versions().items() if k in ("compresslm", "torch", "transformers")},
                "device": str(device), "torch_threads": torch.get_num_threads()}  # fmt: skip
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def _with_hidden(batches: list[Batch], hidden: list[torch.Tensor]) -> list[Batch]:
    """`batches` with the carried hidden states in place of their first argument."""
    if len(hidden) != len(batches):
        raise CompressLMError(f"the journal carries {len(hidden)} batches where this run has {len(batches)}")
    return [Batch((h, *b.args[1:]), b.kwargs, b.as_tuple) for h, b in zip(hidden, batches, strict=True)]


def _compress_linear(
    lm: LoadedModel,
    info: LinearInfo,
    stages: list,
    hessian: torch.Tensor | None,
    pattern: SparsityPattern | None,
    stream_hessians: dict[str | float, torch.Tensor],
    stats: BlockStatistics | None,
    input_scales: dict[str, torch.Tensor],
) -> tuple[CompressedWeight, LayerReport]:
    """One linear: its record from the built-in and the registered stages, swapped into the model as a
    CompressedLinear (at the dial's narrowest width, with its activation grid), and its report line.

    `stream_hessians` are the dial's other calibration streams: the chain's ("chain") and each
    separately pruned ratio's.
    """
    started = time.perf_counter()
    original = dense_weight(info.module, info.transposed).float()
    chain = stream_hessians.get("chain")
    pruned = {key: h for key, h in stream_hessians.items() if key != "chain"}
    built_in = [stage for stage in stages if kind_of(stage).apply is None]
    record = compress_weight(info.name, original, built_in, hessian, pattern, chain, pruned) if built_in else None
    record = _apply_stages(info.name, original, stages, hessian, record)
    new = _replace(lm, info, record)
    if lm.lazy is not None:  # the original layer is out of the model: its weight need not wait for the block's end
        lm.lazy.drop(info.module)
    if new.nested is not None:  # a dial layer: later blocks calibrate on its narrowest width
        new.dial(min(record.dial.widths))
    rel = _relative_error(original, new.dequantized(torch.float32), hessian) if hessian is not None else None
    quant = _quant_stage(stages)
    if quant is not None and quant.act_bits:
        static = _static_activation_scale(info, quant, stats, input_scales)
        new.set_activation_quantization(quant.act_bits, quant.act_granularity, static)
    method, grid = describe_stages(stages, pattern)
    seconds = time.perf_counter() - started
    return record, LayerReport(info.name, info.role, method, grid, rel, seconds, record.meta)


def _dial_to_stream(module: CompressedLinear, key: str | float) -> None:
    """Set a dial layer to a calibration stream's setting: the chain's narrowest width, or a pruned ratio."""
    if key == "chain":
        module.dial(min(module.nested.dial.chain_widths))
    else:
        module.dial(module.nested.bits, key)


def _quantize_embeddings(
    lm: LoadedModel, stages: list[QuantizeEmbeddingStage], weights: dict, layers: list[LayerReport]
) -> dict[str, CompressedWeight]:
    """RTN-quantize the token embedding (a tied head follows) and/or an untied lm_head, in place.

    This runs before calibration, so the blocks calibrate on the embeddings the model will use.
    An untied lm_head becomes a CompressedLinear and is stored like any linear.
    """
    layout = lm.layout
    embeddings: dict[str, CompressedWeight] = {}
    for stage in stages:
        for target in stage.targets:
            t0 = time.perf_counter()
            if calibrates_head(stage, target, layout.tied_lm_head):
                continue  # after the blocks (`_quantize_head`)
            name = target_module(target, layout)
            if name == layout.token_embedding:
                if name in embeddings:  # a tied head is the embedding: quantize it once
                    continue
                module = lm.model.get_submodule(name)
                record = rtn(module.weight.detach().float(), stage.grid)
                with torch.no_grad():
                    module.weight.copy_(record.dequantize(module.weight.dtype))
                embeddings[name] = record
                role = "embedding+lm_head" if layout.tied_lm_head else "embedding"
            else:
                module = lm.model.get_submodule(name)
                record = rtn(module.weight.detach().float(), stage.grid)
                bias = getattr(module, "bias", None)
                replace_module(lm.model, name, CompressedLinear(record, bias, dtype=module.weight.dtype))
                weights[name] = record
                role = "lm_head"
            layers.append(LayerReport(name, role, "rtn", stage.grid.describe(), None, time.perf_counter() - t0, {}))
    return embeddings


def _quantize_head(
    lm: LoadedModel,
    stage: QuantizeEmbeddingStage,
    hidden: list[Batch],
    device: torch.device,
    weights: dict,
    embeddings: dict,
    layers: list[LayerReport],
    sink: RecordSink | None,
) -> None:
    """GPTQ on the output head after the blocks: a tied head's codes become the embedding's too."""
    layout = lm.layout
    record, relative, seconds = quantize_head(lm, stage, hidden, device)
    if layout.tied_lm_head:
        embedding = lm.model.get_submodule(layout.token_embedding)
        with torch.no_grad():
            embedding.weight.copy_(record.dequantize(embedding.weight.dtype))
        embeddings[layout.token_embedding] = record
        name, role = layout.token_embedding, "embedding+lm_head"
    else:
        name, role = layout.lm_head, "lm_head"
        module = lm.model.get_submodule(name)
        new = CompressedLinear(record, getattr(module, "bias", None), dtype=module.weight.dtype)
        replace_module(lm.model, name, new)
        if sink is None:
            weights[name] = record
        else:
            sink.linear(name, record, new)
    layers.append(LayerReport(name, role, "gptq", stage.grid.describe(), relative, seconds, record.meta))


def _pattern_for(stage: PruneStage | None, block: str, allocation: dict[str, SparsityPattern]):
    """The sparsity pattern of a linear in `block`: its block's allocated ratio under OWL, else the stage's."""
    if stage is None:
        return None
    return allocation[block] if stage.allocation == "owl" else stage.pattern


def _allocate_sparsity(
    lm: LoadedModel,
    targets: dict[str, tuple[LinearInfo, list]],
    batches: list[Batch],
    device: torch.device,
    show_progress: bool,
    on_original: bool,
    cache: StatisticsCache | None,
) -> dict[str, SparsityPattern]:
    """Per-block patterns for a prune stage with allocation 'owl' (empty otherwise).

    OWL needs every block's outlier share before the first block is pruned, so this runs the
    uncompressed model over the calibration windows once, block by block, keeping only a number
    per block; the sequential pass that follows starts again from the same first-block inputs.
    Under `propagate: original` with a statistics cache, this pass's statistics are the ones the
    blocks need, so they are saved and the compression pass runs no forward pass of its own.
    """
    stages = {id(s): s for _, ss in targets.values() for s in ss if isinstance(s, PruneStage) and s.allocation == "owl"}
    if not stages:
        return {}
    if len(stages) > 1:
        raise CompressLMError("only one prune stage with allocation 'owl' is supported per recipe")
    (stage,) = stages.values()
    shares, params, names = [], [], []
    walk = BlockWalk(lm, batches, device, propagate="original", cache=cache if on_original else None,
                     label="owl statistics", show_progress=show_progress)  # fmt: skip
    for step in walk:
        owl_targets = [(info, ss) for info, ss in (targets[i.name] for i in step.block.linears if i.name in targets)
                       if stage in ss]  # fmt: skip
        if owl_targets:
            pairs = [(dense_weight(info.module, info.transposed).float(), step.stats.hessian(info.name))
                     for info, _ in owl_targets]  # fmt: skip
            shares.append(outlier_share(pairs, stage.owl_threshold))
            params.append(sum(w.numel() for w, _ in pairs))
            names.append(step.block.name)
    ratios = owl_ratios(shares, params, stage.pattern.ratio, stage.owl_lambda)
    return {name: stage.pattern.with_ratio(ratio) for name, ratio in zip(names, ratios, strict=True)}
