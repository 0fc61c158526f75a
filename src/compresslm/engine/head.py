"""The output head by GPTQ: the lm_head (or a tied embedding, which then serves both roles with one set of
codes) quantized on the final norm's outputs after the last block.

The head turns the last hidden state into logits, so its rounding error reaches every token's
prediction directly; rounding it to nearest ignores which hidden dimensions carry the signal. Run
after the blocks, its Hessian comes from the hidden states the compressed (or, with `propagate:
original`, the original) blocks produce, as every other linear's does from its block's inputs.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from compresslm.compressed import CompressedWeight
from compresslm.engine import distributed
from compresslm.engine.statistics import InputStatistics
from compresslm.errors import CompressLMError
from compresslm.models.forward import Batch
from compresslm.models.layout import ModelLayout
from compresslm.models.loaded import LoadedModel
from compresslm.quant.gptq import GPTQOptions, gptq, output_error
from compresslm.recipe import QuantizeEmbeddingStage


def calibrates_head(stage: QuantizeEmbeddingStage, target: str, tied: bool) -> bool:
    """Whether `target` of `stage` is the output head quantized by GPTQ after the blocks (not up front)."""
    return stage.method == "gptq" and (target == "lm_head" or tied)


def target_module(target: str, layout: ModelLayout) -> str:
    """The module a `quantize_embedding` target names: the token embedding (which a tied head is), or an
    untied lm_head."""
    return layout.token_embedding if target == "embedding" or layout.tied_lm_head else layout.lm_head


def head_hessian(lm: LoadedModel, hidden: list[Batch], device: torch.device) -> torch.Tensor:
    """2/n·XᵀX of the head's inputs: the final norm applied to the last block's outputs (summed over ranks)."""
    if not hidden:
        raise CompressLMError("method gptq for the head needs the final hidden states; this run has none")
    norm = lm.model.get_submodule(lm.layout.final_norm) if lm.layout.final_norm else nn.Identity()
    stats = InputStatistics(hidden[0].args[0].shape[-1], device)
    with torch.no_grad():
        for batch in hidden:
            stats.add(norm(batch.args[0].to(device)))
    distributed.all_reduce_input(stats)
    return stats.hessian


def quantize_head(
    lm: LoadedModel, stage: QuantizeEmbeddingStage, hidden: list[Batch], device: torch.device
) -> tuple[CompressedWeight, float, float]:
    """The head's record by GPTQ (act-order with static groups, as the quantize stage's default), its
    relative output error on the calibration states and the seconds it took."""
    started = time.perf_counter()
    head = lm.model.get_submodule(lm.layout.lm_head)
    hessian = head_hessian(lm, hidden, device)
    weight = head.weight.detach().to(device).float()
    record = gptq(weight, hessian, stage.grid, GPTQOptions(act_order=True))
    approx = record.dequantize(torch.float32).to(device)
    reference = output_error(weight, torch.zeros_like(weight), hessian)
    relative = output_error(weight, approx, hessian) / reference if reference > 0 else 0.0
    return record, relative, time.perf_counter() - started
