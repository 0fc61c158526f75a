"""One model's calibration split across processes with torch.distributed (gloo on CPU, NCCL on GPUs).

Every rank loads the model and draws the same calibration windows, then keeps a contiguous share of
them (`shard`). Block by block, each rank runs its share through the block and accumulates its
statistics; `all_reduce_statistics` sums XᵀX, Σ|x| and the row counts over the ranks (and takes the
maximum of max|x|), in a fixed order of inputs, so every rank holds the statistics of all windows.
Each rank then runs the same deterministic per-layer solves on the same statistics (the solves are
not yet shared out: the forward passes over the windows are what is split) and only rank 0 writes
the container. Sums taken in another order than one process's round differently in the last bits,
so the container matches the single-process one to float tolerance, not bit for bit
(`tests/test_distributed.py` states the tolerance).

Recipes whose calibration needs more than these sums (AWQ's and SmoothQuant's scale searches run the
block on the windows, the dial's extra streams, OWL's allocation, a size target) are refused with
`--nproc`, and so are the statistics cache and streaming.

`compresslm compress ... --nproc N` spawns N gloo processes on this machine; under `torchrun` the
process group comes from its environment (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), with
NCCL when CUDA is available.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from compresslm.engine.statistics import BlockStatistics, InputStatistics
from compresslm.errors import CompressLMError


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def shard(windows: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of the calibration windows (every rank gets at least one)."""
    if not active():
        return windows
    n, size = len(windows), world()
    if n < size:
        raise CompressLMError(f"{n} calibration windows cannot be split over {size} processes")
    bounds = [round(i * n / size) for i in range(size + 1)]
    return windows[bounds[rank()] : bounds[rank() + 1]]


def all_reduce_statistics(stats: BlockStatistics) -> None:
    """Sum every input's statistics over the ranks, in place (max for max|x|)."""
    for name in sorted(stats.stats):  # the same order on every rank
        all_reduce_input(stats.stats[name])


def all_reduce_input(s: InputStatistics) -> None:
    """Sum one input's statistics over the ranks, in place (max for max|x|)."""
    if not active():
        return
    rows = torch.tensor([s.rows], dtype=torch.float64, device=s.xtx.device)
    for tensor, op in ((s.xtx, dist.ReduceOp.SUM), (s.abs_sum, dist.ReduceOp.SUM), (s.abs_max, dist.ReduceOp.MAX),
                       (rows, dist.ReduceOp.SUM)):  # fmt: skip
        dist.all_reduce(tensor, op=op)
    s.rows = int(rows.item())


def check_recipe(recipe) -> None:
    """Refuse, before any compute, what the split calibration cannot do yet."""
    for stage in recipe.stages:
        if getattr(stage, "rescales_inputs", False):
            raise CompressLMError("--nproc: AWQ and SmoothQuant search their scales on the windows in one process; "
                                  "compress them without --nproc")  # fmt: skip
        if getattr(stage, "nested_widths", None):
            raise CompressLMError("--nproc: the dial calibrates extra streams; compress it without --nproc")
        if getattr(stage, "allocation", "uniform") != "uniform":
            raise CompressLMError("--nproc: OWL's allocation runs its own pass; compress it without --nproc")


def check_split(recipe, stream: bool, target: bool) -> None:
    """Refuse what a compression split over processes cannot do, before any process computes."""
    check_recipe(recipe)
    if stream or target:
        raise CompressLMError("a compression split over processes does not stream or fit a size target yet")


def init_from_environment(device: str | None) -> None:
    """Join the process group torchrun (or our own spawner) describes in the environment."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    backend = "nccl" if device and device.startswith("cuda") and torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank())))
