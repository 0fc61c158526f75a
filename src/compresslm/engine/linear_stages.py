"""Apply a linear layer's recipe stages (quantize, prune, or both in a given order) to its weight.

This is the one place that knows how stages combine; each algorithm stays a pure function:

* quantize only: RTN, GPTQ or AWQ's clip search on the (possibly AWQ-rescaled) weight; with
  `keep_zeros` the weight's exact zeros are held as a mask, as a prune stage's would be (2:4, or a
  bitmask where at least 1 in `bits` entries is zero, so that the mask pays for itself);
* prune only: magnitude, Wanda or SparseGPT; kept weights stay float16;
* prune, then quantize: the mask is chosen on float weights, then the kept weights are quantized
  with the mask held fixed (GPTQ compensates the rounding error of the kept weights). SparseGPT
  followed by GPTQ runs as one joint sweep, as in the SparseGPT paper;
* quantize, then prune: the mask is chosen on the quantized weights by the pruning method's
  score, and the kept weights keep their codes.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from compresslm.compressed import CompressedWeight, DialMeta
from compresslm.errors import CompressLMError
from compresslm.quant.awq import awq_clip
from compresslm.quant.gptq import GPTQOptions, gptq
from compresslm.quant.nested import nested_quantize, with_alternates
from compresslm.quant.rtn import rtn
from compresslm.recipe import PruneStage, QuantizeStage
from compresslm.sparse.masks import SparsityPattern, held_zeros
from compresslm.sparse.nested import nested_sparsegpt
from compresslm.sparse.prune import apply_mask, magnitude, saliency_mask, sparsegpt, wanda

# a weight with this fraction of exact zeros is a pruned checkpoint: GPTQ without a mask writes into them
ZEROS_WARNING = 0.25
ZEROS_MESSAGE = (
    "a weight has at least a quarter of its entries exactly zero (a pruned checkpoint?): GPTQ's error "
    "feedback writes into them, some become non-zero and the result is stored dense; use keep_zeros "
    "(preset flag -keepzeros, e.g. w4-g64-gptq-keepzeros) to hold them as a mask"
)


def describe_stages(stages: list, pattern: SparsityPattern | None) -> tuple[str, str]:
    """(method, grid) labels for the per-layer report, e.g. ('wanda>gptq', '50% (row) + W4 g64 asym')."""
    methods, grids = [], []
    for stage in stages:
        if isinstance(stage, PruneStage):
            methods.append(stage.method)
            grids.append(pattern.describe())
        elif isinstance(stage, QuantizeStage):
            methods.append(stage.method)
            grids.append(stage.grid.describe())
        else:  # a registered stage: its type, and its own description where it has one
            methods.append(getattr(stage, "method", stage.type))
            grids.append(stage.describe() if callable(getattr(stage, "describe", None)) else stage.type)
    return ">".join(methods), " + ".join(grids)


def compress_weight(
    name: str,
    weight: torch.Tensor,
    stages: list,
    hessian: torch.Tensor | None,
    pattern: SparsityPattern | None = None,
    chain_hessian: torch.Tensor | None = None,
    sparse_hessians: dict[float, torch.Tensor] | None = None,
) -> CompressedWeight:
    """Turn `weight` [out, in] into a CompressedWeight by `stages` (at most one prune and one quantize).

    `pattern` overrides the prune stage's own (layer-wise allocation gives each block its ratio).
    `chain_hessian`: for a dial with separate widths, the Hessian of the stream propagated at its
    chain's narrowest width; `sparse_hessians`: for a dial's separately pruned ratios, the Hessian
    of the stream propagated at each ratio (see `_dial`).
    """
    prune = next((s for s in stages if isinstance(s, PruneStage)), None)
    quant = next((s for s in stages if isinstance(s, QuantizeStage)), None)
    needs_stats = (quant is not None and quant.method != "rtn") or (prune is not None and prune.method != "magnitude")
    if needs_stats and hessian is None:
        raise CompressLMError(f"{name}: {'/'.join(s.method for s in stages)} needs calibration statistics")
    if prune is not None:
        pattern = pattern or prune.pattern
        try:
            pattern.check(tuple(weight.shape))
        except CompressLMError as exc:
            raise CompressLMError(f"{name}: {exc}") from None
    if quant is not None and quant.nested_widths:
        if prune is not None:
            raise CompressLMError(f"{name}: the dial's nested widths do not combine with pruning yet")
        chain = chain_hessian if chain_hessian is not None else hessian
        return _dial(name, weight, quant, hessian, chain, sparse_hessians or {})
    if prune is None:
        if quant.keep_zeros:
            return _quantize(weight, quant, hessian, *held_zeros(weight, quant.bits))
        if quant.method == "gptq" and float((weight == 0).float().mean()) >= ZEROS_WARNING:
            warnings.warn(ZEROS_MESSAGE, stacklevel=2)
        return _quantize(weight, quant, hessian)
    if quant is None:
        return _prune(weight, prune, pattern, hessian)
    if stages.index(prune) < stages.index(quant):
        if prune.method == "sparsegpt" and quant.method == "gptq" and prune.grid_fit != "after":
            options = GPTQOptions(prune.block_size, prune.damp)
            return sparsegpt(weight, hessian, pattern, quant.grid, options, fit_on=prune.grid_fit)
        pruned = _prune(weight, prune, pattern, hessian)
        return _quantize(pruned.dequantize(), quant, hessian, pruned.mask, pattern.nm)
    record = _quantize(weight, quant, hessian)
    mask = saliency_mask(prune.method, record.dequantize(), hessian, pattern)
    return apply_mask(record, mask, pattern.nm)


def _dial(
    name: str,
    weight: torch.Tensor,
    quant: QuantizeStage,
    hessian: torch.Tensor | None,
    chain_hessian: torch.Tensor | None,
    sparse_hessians: dict[float, torch.Tensor],
) -> CompressedWeight:
    """A dial weight: the nested chain, the separate widths, the nested-sparse plane and the separately
    pruned ratios.

    The separate widths calibrate on `hessian` (the stream the narrowest width propagates); the
    chain, the sparse plane and the sparsity order on `chain_hessian`, the stream propagated at
    the chain's narrowest width (the same Hessian when the engine keeps one stream); each separately
    pruned ratio on its own stream's Hessian (`sparse_hessians`, falling back to `chain_hessian`),
    so that it is exactly the SparseGPT + GPTQ compression a dedicated run would make with the prune
    stage's `grid_fit` equal to `separate_sparsity_fit` (default `after`: SparseGPT, then GPTQ on its mask).
    """
    priorities = tuple(quant.nested_priorities) or None
    record = nested_quantize(weight, tuple(quant.nested_widths), quant.grid.group_size_for(weight.shape[1]),
                             chain_hessian if quant.method == "gptq" else None, quant.gptq_options,
                             priorities)  # fmt: skip
    single = {"nested_widths": [], "nested_priorities": [], "separate_widths": [], "dial_sparsity": [],
              "dial_sparsity_priorities": [], "separate_sparsity": []}  # fmt: skip
    # widths a shared code serves badly: quantized on their own
    alternates = [_quantize(weight, dataclasses.replace(quant, bits=bits, **single), hessian)
                  for bits in sorted(quant.separate_widths)]  # fmt: skip
    if quant.dial_sparsity:  # sparse settings: values updated for nested sparsity, with their own order
        levels = tuple(quant.dial_sparsity)
        priorities = tuple(quant.dial_sparsity_priorities) or (1.0,) * len(levels)
        alternates.append(nested_sparsegpt(weight, chain_hessian, levels, priorities, quant.grid, quant.block_size,
                                           quant.damp))  # fmt: skip
    for ratio in quant.separate_sparsity:  # ratios the shared plane serves badly: pruned on their own
        # the dedicated two-stage compression itself; by default (`separate_sparsity_fit: after`) SparseGPT in
        # float, then the kept weights quantized with the mask fixed (the two orders measured side by side:
        # `benchmarks/results/sparse_then_round_70_w8.md`)
        prune = PruneStage(method="sparsegpt", sparsity=ratio, damp=quant.damp, block_size=quant.block_size,
                           grid_fit=quant.separate_sparsity_fit)  # fmt: skip
        plane = compress_weight(name, weight, [prune, dataclasses.replace(quant, **single)],
                                sparse_hessians.get(ratio, chain_hessian))  # fmt: skip
        alternates.append(dataclasses.replace(plane, meta=DialMeta(sparsity=ratio).with_meta(plane.meta)))
    if alternates:
        record = with_alternates(record, alternates)
    if chain_hessian is not None:  # the input norms order the dial's nested sparsity (Wanda's score)
        record.importance = torch.diagonal(chain_hessian).clamp_min(0).sqrt().to(torch.float16)
    return record


def _prune(
    weight: torch.Tensor, stage: PruneStage, pattern: SparsityPattern, hessian: torch.Tensor | None
) -> CompressedWeight:
    if stage.method == "magnitude":
        return magnitude(weight, pattern)
    if stage.method == "wanda":
        return wanda(weight, hessian, pattern)
    return sparsegpt(weight, hessian, pattern, options=GPTQOptions(stage.block_size, stage.damp))


def _quantize(
    weight: torch.Tensor,
    stage: QuantizeStage,
    hessian: torch.Tensor | None,
    mask: torch.Tensor | None = None,
    nm: tuple[int, int] | None = None,
) -> CompressedWeight:
    if stage.method == "gptq":
        return gptq(weight, hessian, stage.grid, stage.gptq_options, mask=mask, nm=nm)
    if mask is not None:
        weight = weight.masked_fill(~mask, 0.0)
    record = rtn(weight, stage.grid) if stage.method == "rtn" else awq_clip(weight, hessian, stage.grid, stage.awq_grid)
    return record if mask is None else apply_mask(record, mask, nm)
