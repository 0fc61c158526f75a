"""Running a model one decoder block at a time, for calibration and for models too big to run whole.

A batch is one block input as the model passed it: positional arguments (the hidden states first)
and keyword arguments (rotary embeddings, masks). `capture_first_block_inputs` stops the model at
its first block; `run_block` turns a block's inputs into the next block's; `logits_from_hidden`
finishes the model's own forward from the last block's outputs, so whatever the family does after
its blocks (a final norm, a projection, logit soft-capping) is done by its own code.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from compresslm.models.lazy import held
from compresslm.models.loaded import LoadedModel


class StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


@dataclass
class Batch:
    args: tuple
    kwargs: dict
    as_tuple: bool = False  # the block that produced it returned a tuple (some families' blocks do)


@dataclass
class Carried:
    """What a compression carries from one block to the next: enough to resume at `next_block`.

    The hidden states of each calibration batch (the main stream, the fold-verification probe and
    the dial's streams; their other arguments are recomputed), and the reports made so far.
    """

    next_block: int
    inputs: list[torch.Tensor]
    probe: list[torch.Tensor]
    streams: dict[str, list[torch.Tensor]]
    layers: list[dict]
    folds: list[dict]


def capture_first_block_inputs(
    lm: LoadedModel, windows: torch.Tensor, batch_size: int, device: torch.device
) -> list[Batch]:
    """The first block's inputs for `windows`, `batch_size` windows per batch (the model stops there)."""
    first = lm.layout.blocks[0].module
    batches: list[Batch] = []

    def hook(module, args, kwargs):
        batches.append(Batch(tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))
        raise StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with held(lm.lazy, lm.model):  # a lazily loaded model's embedding is read for this and dropped after
            for start in range(0, windows.shape[0], batch_size):
                with contextlib.suppress(StopForward):
                    lm.model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()
    for batch in batches:
        batch.kwargs.pop("past_key_value", None)
        batch.kwargs.pop("past_key_values", None)
        batch.kwargs["use_cache"] = False
    return batches


def run_block(block: nn.Module, batches: list[Batch]) -> list[Batch]:
    """The block's outputs, as the next block's inputs (its keyword arguments carried over)."""
    outputs = []
    for batch in batches:
        out = block(*batch.args, **batch.kwargs)
        hidden = out[0] if isinstance(out, (tuple, list)) else out
        outputs.append(Batch((hidden, *batch.args[1:]), batch.kwargs, isinstance(out, (tuple, list))))
    return outputs


def logits_from_hidden(lm: LoadedModel, input_ids: torch.Tensor, last: Batch) -> torch.Tensor:
    """The model's logits for `input_ids`, given `last`, its last block's output for them.

    The model's own forward runs with every block replaced by a pass-through (the first one hands
    over `last`'s hidden states), so no block weight is touched and the family's own code does
    what follows the blocks.
    """
    hidden = last.args[0]

    def wrap(value: torch.Tensor) -> object:
        return (value,) if last.as_tuple else value

    def first(*args, **kwargs):
        return wrap(hidden)

    def passthrough(*args, **kwargs):
        return wrap(args[0] if args else kwargs["hidden_states"])

    blocks = [block.module for block in lm.layout.blocks]
    for index, block in enumerate(blocks):
        block.forward = first if index == 0 else passthrough
    try:
        with held(lm.lazy, lm.model):
            return lm.model(input_ids=input_ids, use_cache=False).logits
    finally:
        for block in blocks:
            del block.forward
