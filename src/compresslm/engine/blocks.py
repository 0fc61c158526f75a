"""Calibration block by block: collect a block's statistics, and walk the blocks in order.

The public pieces every calibration pass is made of: the sequential engine, the budget solver and
the OWL allocation call them in their own order. Capturing the first block's inputs and running a
block are `models.forward`'s (evaluation streams blocks with them too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from compresslm.engine.distributed import all_reduce_statistics
from compresslm.engine.statistics import BlockStatistics, StatisticsCollector
from compresslm.engine.stats_cache import StatisticsCache
from compresslm.models.forward import Batch, run_block
from compresslm.models.layout import BlockInfo
from compresslm.models.loaded import LoadedModel
from compresslm.progress import progress


def collect_statistics(
    block: BlockInfo, batches: list[Batch], device: torch.device
) -> tuple[BlockStatistics, list[Batch]]:
    """Hessians and activation means for every linear of the block (see engine.statistics), and its outputs.

    Under torch.distributed each rank passes its share of the windows, and the statistics returned
    are summed over all ranks (`engine.distributed`)."""
    collector = StatisticsCollector(device)
    handles = [info.module.register_forward_pre_hook(collector.linear_hook(info.name)) for info in block.linears]
    for name in block.norms:
        handles.append(block.module.get_submodule(name.removeprefix(block.name + ".")).register_forward_hook(
            collector.norm_hook(name)))  # fmt: skip
    outputs = []
    try:
        for batch in batches:
            collector.new_pass()
            outputs.extend(run_block(block.module, [batch]))
    finally:
        for handle in handles:
            handle.remove()
    all_reduce_statistics(collector.result)
    return collector.result, outputs


PROPAGATIONS = ("compressed", "original")


@dataclass
class BlockStep:
    """One block as a walk hands it to its caller: its statistics on its calibration inputs."""

    index: int
    block: BlockInfo
    stats: BlockStatistics | None  # None without calibration (no inputs and no cache)
    inputs: list[Batch]  # empty when the statistics came from a cache


class BlockWalk:
    """Walk a model block by block: each block's statistics on its inputs, handed to the caller (who may
    compress the block), then the next block's inputs.

    A lazily loaded model's block is read from disk before its step and dropped after it, so one
    block's weights are resident at a time.

    `propagate="compressed"`: the next inputs are the outputs of the block as the caller left it, so
    later blocks calibrate against the errors of earlier ones. `"original"`: the statistics pass's
    own outputs (the block before the caller changed it), so the statistics depend on the model and
    the windows alone; with a `cache` they are saved, and a walk without inputs loads them instead of
    running anything. After the walk, `inputs` holds the last block's outputs (the final hidden states).
    """

    def __init__(
        self,
        lm: LoadedModel,
        inputs: list[Batch],
        device: torch.device,
        *,
        propagate: str = "compressed",
        cache: StatisticsCache | None = None,
        label: str = "calibrate",
        show_progress: bool = True,
        start: int = 0,
        after_block: Callable[[BlockStep], None] | None = None,
    ) -> None:
        if propagate not in PROPAGATIONS:
            raise ValueError(f"propagate={propagate!r}; choose one of {', '.join(PROPAGATIONS)}")
        self.lm, self.inputs, self.device = lm, inputs, device
        self.propagate, self.cache, self.label, self.show_progress = propagate, cache, label, show_progress
        self.start, self.after_block = start, after_block
        self._bar = None
        self._counted = 0  # the current block's layers the bar has counted

    def layer_done(self) -> None:
        """One linear of the current block is finished: the bar (whose unit is a linear layer, so that its
        rate and ETA move within a block of a large model) counts it now instead of at the block's end."""
        if self._bar is not None:
            self._bar.update(1)
            self._counted += 1

    def __iter__(self) -> Iterator[BlockStep]:
        """Blocks from `start` on (`inputs` are then that block's); `after_block` sees each step once the
        next block's inputs are in `self.inputs` and before a lazily loaded block is dropped."""
        blocks = self.lm.layout.blocks
        done = sum(len(block.linears) for block in blocks[: self.start])
        bar = progress(sum(len(block.linears) for block in blocks), self.label, unit="layer",
                       enabled=self.show_progress, initial=done)  # fmt: skip
        self._bar = bar
        lazy = self.lm.lazy
        for index, block in enumerate(blocks):
            if index < self.start:
                continue
            bar.set_postfix_str(f"block {index + 1}/{len(blocks)}", refresh=False)
            self._counted = 0
            if lazy is not None:
                lazy.materialize(block.module, block.name)
            if self.inputs:
                stats, outputs = collect_statistics(block, self.inputs, self.device)
                if self.propagate == "original" and self.cache is not None:
                    self.cache.save(index, stats)
            else:
                stats = self.cache.load(index, self.device) if self.cache is not None else None
                outputs = []
            step = BlockStep(index, block, stats, self.inputs)
            yield step
            if self.propagate == "original":
                self.inputs = outputs
            elif self.inputs:
                self.inputs = run_block(block.module, self.inputs)
            if self.after_block is not None:
                self.after_block(step)
            if lazy is not None:
                lazy.release(block.module, block.name)
                for info in block.linears:  # the layers a caller swapped out are still referenced here
                    lazy.drop(info.module)
            bar.update(len(block.linears) - self._counted)
        bar.close()
        self._bar = None
