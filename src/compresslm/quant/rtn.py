"""Round-to-nearest: every weight to its nearest grid point. The baseline every method must beat."""

from __future__ import annotations

import torch

from compresslm.compressed import CompressedWeight
from compresslm.quant.grid import Grid, check_weight, fit_weight, quantize_weight, to_compressed


def rtn(weight: torch.Tensor, grid: Grid) -> CompressedWeight:
    """Quantize a [out, in] weight to `grid` by rounding to nearest (with the grid's clip search, if any)."""
    check_weight(weight)
    weight = weight.detach().float()
    grid = grid.for_width(weight.shape[1])
    scales, zeros = fit_weight(weight, grid)
    codes = quantize_weight(weight, grid, scales, zeros)
    return to_compressed(codes, scales, zeros, grid, {"algorithm": "rtn", "grid": grid.describe()})
