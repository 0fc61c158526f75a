"""The budget solver: per-layer bit widths chosen from measured sensitivity so a container fits a size.

1. One pass of the *uncompressed* model over the calibration windows, block by block, collects
   every linear's input Hessian H (and the lm_head's, from the final norm's output).
2. For each linear and each candidate bit width, the recipe's own method (`estimate="method"`, the
   default: GPTQ, or SparseGPT + GPTQ for a sparse option, exactly as the compression will run
   them) or plain RTN (`estimate="rtn"`, faster) gives the output error per output channel,
   diag(ΔW H ΔWᵀ) (squared output error summed over the calibration tokens), and the exact bytes
   the container will spend on it (packed codes, float16 scales, packed zero points, blob
   alignment). RTN estimates ignore how much of each option's error the method then removes, which
   differs between widths and between dense and sparse options.
   A tied embedding is an item too (float16, 8 or 4 bits), its error measured where it matters
   most, as the lm_head (it is rounded by RTN in the compression too).
   With `sensitivity="fisher"` (the default) each channel's error is weighted by the mean squared
   gradient of the calibration loss with respect to that output (a diagonal empirical Fisher, from
   one backward pass over `fisher_windows` windows): the second-order estimate of how much the
   loss rises, which compares layers; the unweighted output error ("output") does not, since a
   unit of error in an early down_proj and in a late v_proj cost the loss very differently.
   Sparse options (`sparsity_options`, on by default where the recipe's method allows them: GPTQ or
   RTN without input rescaling) add, per linear, 50 % sparsity at 3 and 4 bits and 2:4 at 2, 3 and 4
   bits (with group 64, 2:4 at 2 bits costs less than dense 2 bits, its index included): their error
   is measured the same way (SparseGPT + the recipe's method, or with `estimate="rtn"` Wanda's mask
   and RTN on the kept weights), and their bytes count the kept codes and the stored mask. Chosen,
   they compress as SparseGPT then the recipe's method (one joint sweep with GPTQ).
3. A multiple-choice knapsack (`quant.allocation.allocate`) picks one option per item so that the
   whole file, including everything that stays dense, the tokenizer and a margin for the header,
   fits the budget with the least total error.

The plan becomes an ordinary recipe (one quantize stage per bit width and one SparseGPT stage per
sparsity pattern, targeting module paths),
so the compression itself is the usual sequential pass with the recipe's method (e.g. GPTQ).

A recipe of one `lowrank` stage is planned the same way, with ranks instead of widths: each linear
may stay dense (float16) or lose 10 % to 80 % of its parameters to factors of the stage's method,
each option's error measured on the truncation that method makes (one decomposition per layer),
so the ranks differ between layers where their spectra differ.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass

import torch

from compresslm.data.calibration import calibration_windows
from compresslm.engine.head import target_module
from compresslm.engine.linear_stages import compress_weight
from compresslm.errors import CompressLMError
from compresslm.formats.header_check import align
from compresslm.formats.sizes import planned_nbytes
from compresslm.lowrank.factorize import rank_for_ratio, truncations
from compresslm.models.assemble import tokenizer_files
from compresslm.models.layout import embedding_share
from compresslm.models.loaded import LoadedModel
from compresslm.quant.allocation import allocate
from compresslm.quant.gptq import hessian_from_inputs
from compresslm.quant.grid import Grid
from compresslm.quant.rtn import rtn
from compresslm.recipe import LowRankStage, PruneStage, QuantizeEmbeddingStage, QuantizeStage, Recipe
from compresslm.runtime.linear import dense_weight
from compresslm.sparse.masks import SparsityPattern, select_mask
from compresslm.sparse.prune import scores

BITS_OPTIONS = (2, 3, 4, 5, 6, 8)
EMBEDDING_OPTIONS = (16, 8, 4, 3, 2)
# The JSON header: ~1.7 KB per compressed linear was measured (blob index, per-layer report, GPTQ
# meta); the budget reserves 2 KB each plus the module paths the recipe lists, and 16 KB more.
HEADER_BYTES_PER_LINEAR = 2048
HEADER_BYTES_FIXED = 16384


RATIO_OPTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # shares of a layer's parameters a lowrank plan may remove
SPARSE_BITS = (3, 4)
NM_SPARSE_BITS = (2, 3, 4)  # an N:M index is cheaper than a bit mask: 2 bits at 2:4 is the smallest option
SPARSITY_OPTIONS = ("50%", "2:4")


def sparse_options_allowed(stage: QuantizeStage) -> bool:
    """Sparse options need a method that quantizes kept weights under a fixed mask, without rescaling inputs."""
    return (
        stage.method in ("gptq", "rtn")
        and stage.granularity == "group"
        and not (stage.awq_scale or stage.smoothquant or stage.act_bits or stage.nested_widths)
    )


@dataclass
class BudgetPlan:
    recipe: Recipe
    choices: dict[str, int | str]  # module path -> bits (16 = float16 for the embedding) or "<bits>+<sparsity>"
    predicted_bytes: int
    budget_bytes: int
    fixed_bytes: int
    total_error: float
    seconds: float = 0.0  # planning time: statistics, sensitivity and the knapsack
    dense_linear_params: int = 0  # weights of linears a lowrank plan keeps dense (float16, outside the records)


def _grid(stage: QuantizeStage, bits: int) -> Grid:
    return dataclasses.replace(stage.grid, bits=bits)


def _fixed_bytes(lm: LoadedModel, quantized: set[str], dense_bytes: int) -> int:
    """Bytes of everything that is not a quantized item: dense tensors, tokenizer files, header."""
    total, seen = 0, set()
    for key, tensor in lm.model.state_dict(keep_vars=True).items():
        ptr = (tensor.data_ptr(), tuple(tensor.shape))
        if ptr in seen:  # a tied lm_head is stored once, as the embedding
            continue
        seen.add(ptr)
        if key in quantized:
            continue
        total += align(tensor.numel() * (dense_bytes if tensor.is_floating_point() else tensor.element_size()))
    total += sum(align(len(data)) for data in tokenizer_files(lm.tokenizer).values())  # what the container stores
    names = sum(len(key) + 4 for key in quantized)
    header = HEADER_BYTES_FIXED + len(json.dumps(lm.model.config.to_dict())) + HEADER_BYTES_PER_LINEAR * len(quantized)
    header += names
    return total + header


def _carried_embedding(
    lm: LoadedModel, stages: list[QuantizeEmbeddingStage], chosen_here: bool, quantized: set[str]
) -> tuple[list[QuantizeEmbeddingStage], int]:
    """The recipe's embedding stage where the plan keeps it (the solver does not choose the embedding's bits
    itself, and the stage applies to this model), with the bytes of what it quantizes; those tensors' names
    join `quantized`, so that they are not also counted dense."""
    layout = lm.layout
    if not stages or chosen_here or not stages[0].applies(embedding_share(lm.model, layout)):
        return [], 0
    stage = stages[0]
    names = {target_module(target, layout) for target in stage.targets}
    total = 0
    for name in names:
        quantized.add(f"{name}.weight")
        total += planned_nbytes(tuple(lm.model.get_submodule(name).weight.shape), stage.grid)
    return [stage], total


SENSITIVITIES = ("fisher", "output")


def output_fisher(lm: LoadedModel, windows: torch.Tensor, names: list[str], batch_size: int = 1) -> dict:
    """Per output channel of each named linear: the summed squared gradient of the mean next-token loss.

    One forward and backward pass over `windows` with the weights frozen; only the activations'
    gradients are kept (hooks on the linears' outputs). The batch size scales every layer's value
    by the same factor (the plan does not change), so batches are small: the backward pass holds
    the batch's logits and activations, which grow with the vocabulary and the window length.
    """
    fisher = {name: None for name in names}
    handles = []

    def hook_for(name: str):
        def record(grad: torch.Tensor) -> None:
            g = grad.detach().float().reshape(-1, grad.shape[-1]).square().sum(0)
            fisher[name] = g if fisher[name] is None else fisher[name] + g

        def hook(module, args, out) -> None:  # returns None: the output is left as it is
            if out.requires_grad:
                out.register_hook(record)

        return hook

    for name in names:
        handles.append(lm.model.get_submodule(name).register_forward_hook(hook_for(name)))
    embed = lm.model.get_input_embeddings()
    flags = {p: p.requires_grad for p in lm.model.parameters()}
    try:
        for param in flags:
            param.requires_grad_(False)
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size].to(lm.device)
            with torch.enable_grad():
                hidden = embed(ids).detach().requires_grad_(True)
                out = lm.model(inputs_embeds=hidden, labels=ids, use_cache=False)
                out.loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for param, flag in flags.items():
            param.requires_grad_(flag)
    missing = [name for name, value in fisher.items() if value is None]
    if missing:
        raise CompressLMError(f"no gradient reached {missing[:3]}: cannot weight their sensitivity")
    return fisher


def _weighted_error(weight, approx, hessian, fisher: torch.Tensor | None) -> float:
    rows = _row_errors(weight, approx, hessian)
    return float(rows.sum() if fisher is None else (rows * fisher.to(rows.device)).sum())


ESTIMATES = ("method", "rtn")


def _approximation(
    name: str,
    weight: torch.Tensor,
    hessian: torch.Tensor,
    stage: QuantizeStage,
    bits: int,
    sparsity: str | None,
    estimate: str,
) -> torch.Tensor:
    """The weight an option would leave: compressed as the plan's recipe will (`"method"`) or by RTN.

    `"method"` calls the engine's own `compress_weight` with the stages the plan writes for this
    option (SparseGPT then the recipe's quantize stage for a sparse one), on the uncompressed
    model's Hessian; `"rtn"` rounds to the grid (on Wanda's mask for a sparse option).
    """
    quant = dataclasses.replace(stage, bits=bits, targets=[])
    if estimate == "rtn":
        if sparsity is None:
            return rtn(weight, quant.grid).dequantize()
        mask = select_mask(scores("wanda", weight, hessian), SparsityPattern.parse(sparsity))
        return rtn(weight.masked_fill(~mask, 0.0), quant.grid).dequantize() * mask
    stages: list = [quant]
    if sparsity is not None:
        stages.insert(0, PruneStage(method="sparsegpt", sparsity=sparsity, damp=stage.damp))
    return compress_weight(name, weight, stages, hessian).dequantize().float()


def _lowrank_options(
    weight: torch.Tensor, hessian: torch.Tensor, stage: LowRankStage, fisher: torch.Tensor | None, aligned: bool
) -> tuple[list[tuple[float, float]], list[float]]:
    """(bits, error) of the layer kept dense in float16 and of each share of its parameters removed."""
    shape = tuple(weight.shape)
    pad = align if aligned else (lambda size: size)
    rows, labels = [(8.0 * pad(2 * shape[0] * shape[1]), 0.0)], [0.0]
    ranks = {ratio: rank_for_ratio(shape, ratio) for ratio in RATIO_OPTIONS}
    ranks = {ratio: rank for ratio, rank in ranks.items() if rank >= 1}
    approximations = truncations(weight, sorted(set(ranks.values())), stage.method, hessian, stage.alpha, stage.damp)
    for ratio, rank in ranks.items():
        nbytes = pad(2 * shape[0] * rank) + pad(2 * rank * shape[1])
        rows.append((8.0 * nbytes, _weighted_error(weight, approximations[rank], hessian, fisher)))
        labels.append(ratio)
    return rows, labels


def _row_errors(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """diag(ΔW H ΔWᵀ): each output channel's squared error summed over the calibration inputs."""
    delta = weight - approx
    return ((delta @ hessian) * delta).sum(1)


@dataclass(frozen=True)
class BudgetTarget:
    """A size the compressed model must fit: exactly one of `bits` (per parameter of the whole file),
    `bytes` (the whole file) or `linear_bits` (per weight of the compressed linears), and how the
    solver measures sensitivity, which sparsity patterns it may use (None: its default) and how it
    estimates each option's error (see `plan_budget`)."""

    bits: float | None = None
    bytes: int | None = None
    linear_bits: float | None = None
    sensitivity: str = "fisher"
    sparsity: tuple[str, ...] | None = None
    estimate: str = "method"

    def describe(self) -> str:
        if self.linear_bits is not None:
            return f"{self.linear_bits:g} bits per linear weight"
        return f"{self.bits:g} bits/param" if self.bits is not None else f"{self.bytes:,} bytes"

    def plan(self, lm: LoadedModel, base: Recipe, show_progress: bool = True) -> BudgetPlan:
        return plan_budget(
            lm, base, target_bits=self.bits, target_bytes=self.bytes, target_linear_bits=self.linear_bits,
            sensitivity=self.sensitivity, sparsity_options=self.sparsity, estimate=self.estimate,
            show_progress=show_progress,
        )  # fmt: skip

    def check(self, plan: BudgetPlan, summary: dict) -> None:
        """Raise unless the written container fits: the file for `bits`/`bytes`, the linears for `linear_bits`."""
        dense, params = plan.dense_linear_params, summary["linear_parameters"]
        bits = (summary["linear_bits_per_param"] * params + 16 * dense) / max(params + dense, 1)
        if self.linear_bits is not None and bits > self.linear_bits + 1e-9:
            raise CompressLMError(f"the linears take {bits:.4f} bits per weight, over {self.linear_bits}")
        if self.linear_bits is None and summary["bytes_on_disk"] > plan.budget_bytes:
            raise CompressLMError(
                f"the written container is {summary['bytes_on_disk']:,} B, over the budget of {plan.budget_bytes:,} B "
                "(the header estimate was too small); nothing else is wrong with the file"
            )


def plan_budget(
    lm: LoadedModel,
    base: Recipe,
    *,
    target_bits: float | None = None,
    target_bytes: int | None = None,
    target_linear_bits: float | None = None,
    bits_options: tuple[int, ...] = BITS_OPTIONS,
    sensitivity: str = "fisher",
    fisher_windows: int = 32,
    sparsity_options: tuple[str, ...] | None = None,
    estimate: str = "method",
    show_progress: bool = True,
) -> BudgetPlan:
    """Choose per-layer bits and sparsity (and the tied embedding's bits) so the written container fits.

    `target_linear_bits` budgets the compressed linears alone (codes, scales, zero points per
    weight, as `linear_bits_per_param` counts them); the embedding is then left as the recipe has it.
    `sensitivity` is "fisher" (loss-weighted output error, see the module docstring) or "output".
    `sparsity_options` (default: 50 % and 2:4 where the recipe's method allows them, else none;
    `()` for none) lists the patterns offered at 3 and 4 bits (N:M ones also at 2). `estimate` is
    "method" (each option's error from the recipe's own method, as the compression will run it) or
    "rtn" (see the module docstring).
    """
    from compresslm.engine.blocks import BlockWalk
    from compresslm.models.forward import capture_first_block_inputs

    started = time.perf_counter()
    if sum(t is not None for t in (target_bits, target_bytes, target_linear_bits)) != 1:
        raise CompressLMError("give exactly one budget: bits per parameter, bytes, or bits per linear weight")
    stages = [s for s in base.stages if isinstance(s, (QuantizeStage, LowRankStage))]
    embedding_stages = [s for s in base.stages if isinstance(s, QuantizeEmbeddingStage)]
    if len(stages) != 1 or len(embedding_stages) > 1 or len(base.stages) != 1 + len(embedding_stages):
        raise CompressLMError(
            "the budget solver takes a recipe with one quantize stage (its method and grid) or one lowrank stage "
            "(and at most one quantize_embedding stage)"
        )
    stage = stages[0]
    lowrank = isinstance(stage, LowRankStage)
    if lowrank and sparsity_options:
        raise CompressLMError("a lowrank plan chooses ranks only; it takes no sparsity options")
    if lowrank:
        sparsity_options = ()
    elif sparsity_options is None:
        sparsity_options = SPARSITY_OPTIONS if sparse_options_allowed(stage) else ()
    elif sparsity_options and not sparse_options_allowed(stage):
        raise CompressLMError(
            f"sparse budget options need a gptq or rtn recipe on a group grid without AWQ/SmoothQuant, "
            f"not '{base.name or stage.method}'"
        )
    patterns = [SparsityPattern.parse(p) for p in sparsity_options]
    if estimate not in ESTIMATES:
        raise CompressLMError(f"estimate={estimate!r} is not known; use one of {', '.join(ESTIMATES)}")
    if sensitivity not in SENSITIVITIES:
        raise CompressLMError(f"sensitivity={sensitivity!r} is not known; use one of {', '.join(SENSITIVITIES)}")
    params = sum(p.numel() for p in lm.model.parameters())
    budget = int(target_bytes if target_bytes is not None else (target_bits or 0) * params / 8)
    settings = base.calibration
    calib = calibration_windows(lm.tokenizer, settings.source, settings.samples, settings.length, settings.seed)
    lm.model.eval()
    weights_of: dict[str, torch.Tensor] = {}
    if sensitivity == "fisher":
        names = [i.name for b in lm.layout.blocks for i in b.linears if stage.applies_to(i.role, i.name)]
        if lm.layout.tied_lm_head and target_linear_bits is None and lm.layout.lm_head:
            names.append(lm.layout.lm_head)
        weights_of = output_fisher(lm, calib.windows[:fisher_windows], names)
    batches = capture_first_block_inputs(lm, calib.windows, settings.batch_size, lm.device)
    options: dict[str, list[tuple[float, float]]] = {}
    bits_of: dict[str, list[int | str]] = {}
    walk = BlockWalk(lm, batches, lm.device, propagate="original", label="sensitivity", show_progress=show_progress)
    for step in walk:  # the blocks stay uncompressed
        block, stats = step.block, step.stats
        for info in block.linears:
            if not stage.applies_to(info.role, info.name):
                continue
            weight = dense_weight(info.module, info.transposed).float()
            hessian = stats.hessian(info.name)
            rows, labels = [], list(bits_options)
            fisher, aligned = weights_of.get(info.name), target_linear_bits is None
            if lowrank:
                options[info.name], bits_of[info.name] = _lowrank_options(weight, hessian, stage, fisher, aligned)
                continue
            for bits in bits_options:
                approx = _approximation(info.name, weight, hessian, stage, bits, None, estimate)
                grid = _grid(stage, bits)
                error = _weighted_error(weight, approx, hessian, fisher)
                rows.append((8.0 * planned_nbytes(tuple(weight.shape), grid, aligned=aligned), error))
            for text, pattern in zip(sparsity_options, patterns, strict=True):
                if pattern.is_nm and weight.shape[1] % pattern.m:
                    continue
                for bits in NM_SPARSE_BITS if pattern.is_nm else SPARSE_BITS:
                    approx = _approximation(info.name, weight, hessian, stage, bits, text, estimate)
                    grid = _grid(stage, bits)
                    error = _weighted_error(weight, approx, hessian, fisher)
                    rows.append((8.0 * planned_nbytes(tuple(weight.shape), grid, pattern, aligned), error))
                    labels.append(f"{bits}+{text}")
            options[info.name], bits_of[info.name] = rows, labels
    batches = walk.inputs  # the last block's outputs

    layout = lm.layout
    embedding = None
    if layout.tied_lm_head and target_linear_bits is None:
        norm = lm.model.get_submodule(layout.final_norm) if layout.final_norm else None
        hidden = [norm(b.args[0]) if norm is not None else b.args[0] for b in batches]
        head_hessian = hessian_from_inputs(torch.cat([h.reshape(-1, h.shape[-1]) for h in hidden]))
        weight = lm.model.get_submodule(layout.token_embedding).weight.detach().float()
        rows = [(8.0 * align(weight.numel() * 2), 0.0)]  # float16, as stored when not quantized
        head_fisher = weights_of.get(layout.lm_head) if layout.lm_head else None
        for bits in EMBEDDING_OPTIONS[1:]:
            grid = Grid(bits, "group", 64)
            error = _weighted_error(weight, rtn(weight, grid).dequantize(), head_hessian, head_fisher)
            rows.append((8.0 * planned_nbytes(tuple(weight.shape), grid), error))
        embedding = layout.token_embedding
        options[embedding], bits_of[embedding] = rows, list(EMBEDDING_OPTIONS)

    quantized = {f"{name}.weight" for name in options}
    carried, carried_bytes = _carried_embedding(lm, embedding_stages, embedding is not None, quantized)
    fixed = _fixed_bytes(lm, quantized, 2 if base.dense_dtype != "float32" else 4) + carried_bytes
    available = 8 * (budget - fixed)
    if target_linear_bits is not None:  # the linears' own bytes, without blob alignment slack
        weights = sum(lm.model.get_submodule(name).weight.numel() for name in options)
        available = target_linear_bits * weights
        budget = fixed + int(available / 8)
    choice = allocate(options, available)
    chosen = {name: bits_of[name][index] for name, index in choice.items()}
    predicted = fixed + int(sum(options[name][index][0] for name, index in choice.items()) / 8)

    new_stages: list = list(carried)
    if embedding is not None and chosen[embedding] != 16:
        new_stages.append(QuantizeEmbeddingStage(bits=chosen[embedding], group_size=64))
    linears = {name: choice for name, choice in chosen.items() if name != embedding}
    if lowrank:
        for ratio in sorted({r for r in linears.values() if r}):
            targets = [name for name, r in linears.items() if r == ratio]
            new_stages.append(dataclasses.replace(stage, ratio=ratio, rank=None, targets=targets, ignore=[]))
        linears = {}
    widths = {name: int(str(choice).split("+")[0]) for name, choice in linears.items()}
    for pattern in sorted({str(c).split("+", 1)[1] for c in linears.values() if "+" in str(c)}):
        targets = [name for name, c in linears.items() if str(c).endswith(f"+{pattern}")]
        new_stages.append(PruneStage(method="sparsegpt", sparsity=pattern, damp=stage.damp, targets=targets))
    fields = {f.name: getattr(stage, f.name) for f in dataclasses.fields(stage) if f.name not in ("bits", "targets")}
    for bits in sorted(set(widths.values()), reverse=True):
        targets = [name for name, b in widths.items() if b == bits]
        new_stages.append(QuantizeStage(**{**fields, "bits": bits, "targets": targets}))
    if target_linear_bits is not None:
        label = f"{target_linear_bits:g} bits per linear weight"
    else:
        label = f"{target_bits:g} bits/param" if target_bits is not None else f"{target_bytes:,} bytes"
    how = sensitivity if estimate == "method" else f"{sensitivity}, rtn estimate"
    grid = "low-rank factors" if lowrank else stage.grid.describe()
    recipe = Recipe(new_stages, name=f"budget {label} ({stage.method}, {grid}, {how})",
                    calibration=base.calibration, dense_dtype=base.dense_dtype).validate()  # fmt: skip
    total_error = sum(options[name][index][1] for name, index in choice.items())
    dense = 0
    if lowrank:
        dense = sum(lm.model.get_submodule(n).weight.numel() for n, r in chosen.items() if n != embedding and not r)
    return BudgetPlan(recipe, chosen, predicted, budget, fixed, total_error, time.perf_counter() - started, dense)
