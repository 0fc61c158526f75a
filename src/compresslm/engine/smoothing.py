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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from compresslm.engine.statistics import BlockStatistics
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
def _divide_outputs(module: nn.Module, s: torch.Tensor, transposed: bool) -> None:
    weight = module.weight
    if weight.dim() == 1:  # a norm
        weight.div_(s.to(weight.dtype))
    elif transposed:
        weight.div_(s[None, :].to(weight.dtype))
    else:
        weight.div_(s[:, None].to(weight.dtype))
    bias = getattr(module, "bias", None)
    if bias is not None:
        bias.div_(s.to(bias.dtype))


def fold_input_scales(
    model: nn.Module,
    block: BlockInfo,
    stats: BlockStatistics,
    stages: dict[str, QuantizeStage],
    round_dense: Callable[[nn.Module], None],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[ScaleFold]]:
    """Compute and fold scales for every input group with an AWQ- or SmoothQuant-enabled target.

    `stages` maps the block's target linears to their stage; `round_dense(module)` re-rounds a
    producer that stays dense to its storage dtype. Returns the (possibly scaled) Hessian of every
    linear with statistics, the scales applied to each scaled linear's input, and one ScaleFold
    per group.
    """
    infos = {info.name: info for info in block.linears}
    modules = dict(model.named_modules())
    hessians = {name: stats.hessian(name) for name in stats.owner}
    input_scales: dict[str, torch.Tensor] = {}
    folds: list[ScaleFold] = []
    activation = _activation(model)
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
        folds.append(ScaleFold(method, names, fold_into, alpha, before, after))
        if method == "awq" and alpha == 0.0:
            continue
        for info in consumers:
            _scale_columns(info, s)
            input_scales[info.name] = s
        if norm_name:
            _divide_outputs(modules[norm_name], s, transposed=False)
            round_dense(modules[norm_name])
        else:
            _divide_outputs(producer_linear.module, s, producer_linear.transposed)
            if producer_linear.name not in stages:
                round_dense(producer_linear.module)
        scaled = hessians[owner] / (s[:, None] * s[None, :])
        for name in names:
            hessians[name] = scaled
    return hessians, input_scales, folds
