"""Fold per-input-channel scales (AWQ, SmoothQuant) into a block, leaving its float function unchanged.

For each group of linears that read one input, the scales s (found by `quant.awq.awq_scales`, or
computed by `quant.smoothquant.smoothquant_scales`) multiply the consumers' weight columns and
divide the producer of that input:

* a norm whose output is exactly that tensor (detected during the statistics pass): its weight
  (and bias) are divided by s;
* for an attention output projection whose input width equals the value projection's output
  width (no grouped-query sharing), the value projection's rows;
* for a down projection, the up projection's rows (the gate multiplies elementwise, so the
  scale passes through); for fc2 after a ReLU, fc1's rows (ReLU commutes with positive scales).

Groups with no such producer are left alone and reported. The Hessians of scaled inputs become
S⁻¹HS⁻¹, so GPTQ or the clip search after the fold sees the scaled problem exactly.

Every fold is verified numerically before anything is quantized: the block's float output on a
calibration window after the fold must equal its output before, within a tolerance set by the
dtype. Discovering structure means trusting no family's conventions: some norms compute
x̂·(1 + w) instead of x̂·w (Gemma), and dividing their `weight` by s is wrong. When the plain fold
fails the check, a norm is folded as x̂·(1 + w): w ← (1 + w)/s − 1, and checked again; a fold that
still fails is undone and refused with the module and its class named. Never a silent wrong model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from compresslm.engine.statistics import BlockStatistics
from compresslm.errors import UnsupportedArchitectureError
from compresslm.models.layout import BlockInfo, LinearInfo
from compresslm.quant.awq import awq_scales
from compresslm.quant.smoothquant import smoothquant_scales
from compresslm.recipe import QuantizeStage
from compresslm.runtime.linear import dense_weight


@dataclass
class ScaleFold:
    """What was decided for one input group: the method, where it folded, α and the layer errors."""

    method: str  # "awq" or "smoothquant"
    consumers: list[str]
    fold_into: str | None
    alpha: float
    error_before: float | None
    error_after: float | None
    norm_offset: float = 0.0  # 1.0 where the norm computes x̂·(1 + w) and was folded as such
    verified: float | None = None  # the block output's relative change after the fold (None: not checked)


# The largest relative change of a block's output a fold may cause: float rounding of the scaled
# weights (an x̂·(1 + w) fold loses more to cancellation when s is large), far below a wrong fold.
_FOLD_TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _activation(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "activation_function", None) or getattr(config, "hidden_act", None)


def _producer_linear(block: BlockInfo, consumers: list[LinearInfo], activation: str | None) -> LinearInfo | None:
    roles = {info.role for info in consumers}
    width = consumers[0].in_features
    by_role = {info.role: info for info in block.linears}
    if roles == {"o"} and "v" in by_role and by_role["v"].out_features == width:
        return by_role["v"]
    if roles == {"down"} and "up" in by_role and by_role["up"].out_features == width:
        return by_role["up"]
    if roles == {"fc2"} and activation == "relu" and "fc1" in by_role and by_role["fc1"].out_features == width:
        return by_role["fc1"]
    return None


@torch.no_grad()
def _scale_columns(info: LinearInfo, s: torch.Tensor) -> None:
    weight = info.module.weight
    if info.transposed:
        weight.mul_(s[:, None].to(weight.dtype))
    else:
        weight.mul_(s[None, :].to(weight.dtype))


@torch.no_grad()
def _divide_outputs(module: nn.Module, s: torch.Tensor, transposed: bool, offset: float = 0.0) -> None:
    """Divide what `module` produces by s: a norm's weight (as x̂·(offset + w)) and bias, or a linear's rows."""
    weight = module.weight
    if weight.dim() == 1:  # a norm
        weight.copy_(((weight.float() + offset) / s.float() - offset).to(weight.dtype))
    elif transposed:
        weight.div_(s[None, :].to(weight.dtype))
    else:
        weight.div_(s[:, None].to(weight.dtype))
    bias = getattr(module, "bias", None)
    if bias is not None:
        bias.div_(s.to(bias.dtype))


def _relative_change(output: torch.Tensor, reference: torch.Tensor) -> float:
    diff = (output.double() - reference.double()).norm()
    return float(diff / reference.double().norm().clamp_min(1e-30))


def fold_input_scales(
    model: nn.Module,
    block: BlockInfo,
    stats: BlockStatistics,
    stages: dict[str, QuantizeStage],
    round_dense: Callable[[nn.Module], None],
    block_output: Callable[[], torch.Tensor] | None = None,
    reference: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[ScaleFold]]:
    """Compute, fold and verify scales for every input group with an AWQ- or SmoothQuant-enabled target.

    `stages` maps the block's target linears to their stage; `round_dense(module)` re-rounds a
    producer that stays dense to its storage dtype (after the check). `block_output()` runs the
    block on a calibration window: each fold must leave it unchanged (see the module docstring);
    without it folds are not checked. `reference` is that output before any fold, when the caller
    already has it (else `block_output()` computes it). Returns the (possibly scaled) Hessian of every linear with
    statistics, the scales applied to each scaled linear's input, and one ScaleFold per group.
    """
    infos = {info.name: info for info in block.linears}
    modules = dict(model.named_modules())
    hessians = {name: stats.hessian(name) for name in stats.owner}
    input_scales: dict[str, torch.Tensor] = {}
    folds: list[ScaleFold] = []
    activation = _activation(model)
    if reference is None and block_output is not None:
        reference = block_output()
    for owner, names in stats.groups().items():
        members = [n for n in names if n in stages and stages[n].rescales_inputs]
        if not members:
            continue
        stage = stages[members[0]]
        method = "smoothquant" if stage.smoothquant else "awq"
        consumers = [infos[n] for n in names]
        norm_name = stats.producer.get(owner)
        producer_linear = None if norm_name else _producer_linear(block, consumers, activation)
        fold_into = norm_name or (producer_linear.name if producer_linear else None)
        if fold_into is None:
            folds.append(ScaleFold(method, names, None, 0.0, None, None))
            continue
        weights = [dense_weight(infos[n].module, infos[n].transposed).float() for n in members]
        if method == "awq":
            s, alpha, before, after = awq_scales(
                weights, hessians[owner], stats.stats[owner].act_mean, stage.grid, stage.awq_grid
            )
        else:
            all_weights = [dense_weight(info.module, info.transposed).float() for info in consumers]
            alpha, before, after = stage.smoothquant_alpha, None, None
            s = smoothquant_scales(stats.stats[owner].act_max, all_weights, alpha)
        fold = ScaleFold(method, names, fold_into, alpha, before, after)
        folds.append(fold)
        if method == "awq" and alpha == 0.0:
            continue
        producer = modules[norm_name] if norm_name else producer_linear.module
        transposed = False if norm_name else producer_linear.transposed
        _apply_fold(consumers, producer, transposed, s, fold, reference, block_output)
        if norm_name or producer_linear.name not in stages:
            round_dense(producer)
            if block_output is not None:  # the rounded block is what the next fold must preserve
                reference = block_output()
        for info in consumers:
            input_scales[info.name] = s
        scaled = hessians[owner] / (s[:, None] * s[None, :])
        for name in names:
            hessians[name] = scaled
    return hessians, input_scales, folds


def _apply_fold(consumers: list[LinearInfo], producer: nn.Module, transposed: bool, s: torch.Tensor,
                fold: ScaleFold, reference: torch.Tensor | None,
                block_output: Callable[[], torch.Tensor] | None) -> None:  # fmt: skip
    """Scale the consumers' columns by s and divide the producer by s; keep it only if the block is unchanged."""
    tensors = [info.module.weight for info in consumers] + [p for p in producer.parameters(recurse=False)]
    saved = [t.detach().clone() for t in tensors]
    offsets = (0.0, 1.0) if producer.weight.dim() == 1 else (0.0,)  # a norm may compute x̂·(1 + w)
    changes = []
    for offset in offsets:
        for info in consumers:
            _scale_columns(info, s)
        _divide_outputs(producer, s, transposed, offset)
        if reference is None:
            return
        change = _relative_change(block_output(), reference)
        changes.append(change)
        if change <= _FOLD_TOLERANCE.get(reference.dtype, 2e-3):
            fold.norm_offset, fold.verified = offset, change
            return
        with torch.no_grad():
            for tensor, copy in zip(tensors, saved, strict=True):
                tensor.copy_(copy)
    tried = "as x̂·w and as x̂·(1 + w)" if len(offsets) == 2 else "by dividing its output rows"
    raise UnsupportedArchitectureError(
        f"folding {fold.method.upper()} scales into {fold.fold_into} ({type(producer).__name__}) changes the "
        f"block's output (relative change {', '.join(f'{c:.2g}' for c in changes)}; folded {tried}): this family "
        "computes something the fold does not know; compress without awq_scale/smoothquant for it"
    )
