"""Running a model one decoder block at a time, for calibration and for models too big to run whole.

A batch is one block input as the model passed it: positional arguments (the hidden states first)
and keyword arguments (rotary embeddings, masks). `capture_first_block_inputs` stops the model at
its first block; `run_block` turns a block's inputs into the next block's; `logits_from_hidden`
finishes the model's own forward from the last block's outputs, so whatever the family does after
its blocks (a final norm, a projection, logit soft-capping) is done by its own code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from compresslm.models.lazy import held
from compresslm.models.loaded import LoadedModel
from compresslm.progress import progress


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
    chunks = [(windows[start : start + batch_size], None) for start in range(0, windows.shape[0], batch_size)]
    return capture_inputs(lm, chunks, device)


def capture_inputs(
    lm: LoadedModel, chunks: list[tuple[torch.Tensor, torch.Tensor | None]], device: torch.device
) -> list[Batch]:
    """The first block's inputs for each (token ids, attention mask or None) batch, as the model makes them."""
    first = lm.layout.blocks[0].module
    batches: list[Batch] = []

    def hook(module, args, kwargs):
        batches.append(Batch(tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))
        raise StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with held(lm.lazy, lm.model):  # a lazily loaded model's embedding is read for this and dropped after
            for ids, mask in chunks:
                extra = {} if mask is None else {"attention_mask": mask.to(device)}
                with contextlib.suppress(StopForward):
                    lm.model(input_ids=ids.to(device), use_cache=False, **extra)
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


def streamed_logits(
    lm: LoadedModel, chunks: list[tuple[torch.Tensor, torch.Tensor | None]], show_progress: bool = False
) -> Iterator[torch.Tensor]:
    """The logits of each (token ids, attention mask or None) batch of a model read block by block
    (`load_model(..., lazy=True)`), in order: every batch goes through block i before block i+1 is read,
    so one block's weights and every batch's hidden states are resident; each batch meets the same
    operations as in the whole model's forward, so the logits are the same."""
    batches = capture_inputs(lm, chunks, lm.device)
    bar = progress(len(lm.layout.blocks), "streaming blocks", unit="block", enabled=show_progress)
    for block in lm.layout.blocks:
        lm.lazy.materialize(block.module, block.name)
        batches = run_block(block.module, batches)
        lm.lazy.release(block.module, block.name)
        bar.update(1)
    bar.close()
    with lm.lazy.holding(lm.model):  # the head (and embedding), read once for every batch
        for (ids, _), batch in zip(chunks, batches, strict=True):
            yield logits_from_hidden(lm, ids.to(lm.device), batch)


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
