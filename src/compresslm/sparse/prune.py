"""Pruning algorithms as pure functions of a weight (and, where needed, its input Hessian).

* `magnitude`: keep the largest |W|.
* `wanda` (Sun et al., 2023): keep the largest |W_ij|·‖x_j‖, where ‖x_j‖² is input feature j's
  energy over the calibration tokens: the diagonal of the Hessian, up to a constant.
* `sparsegpt` (Frantar & Alistarh, 2023): sweep the columns left to right; in each block choose
  the mask by the OBS saliency w²/[H⁻¹]²_jj *on the weights as updated so far* (adaptive mask
  selection), zero the pruned weights and spread their error over the columns not yet visited
  through the inverse Hessian's Cholesky factor. Given a grid, every kept weight is also quantized
  in the same sweep (joint sparsification and quantization, as in the paper).

Each returns a `CompressedWeight` whose `mask` is True where a weight is kept; pruned entries are
exact zeros (their codes, when quantized, are the zero point). `saliency_mask` chooses a mask for a
weight that is already final (pruning after quantization: kept weights keep their codes).
"""

from __future__ import annotations

import dataclasses

import torch

from compresslm.compressed import CompressedWeight, expand_groups
from compresslm.errors import CompressLMError
from compresslm.quant.gptq import GPTQOptions, factor_hessian
from compresslm.quant.grid import Grid, check_weight, fit_rows, quantize_codes, to_compressed
from compresslm.sparse.masks import SparsityPattern, select_mask

METHODS = ("magnitude", "wanda", "sparsegpt")


def _check_hessian(hessian: torch.Tensor | None, in_f: int, method: str) -> torch.Tensor:
    if hessian is None:
        raise CompressLMError(f"{method} needs calibration statistics (the input Hessian)")
    if hessian.shape != (in_f, in_f):
        raise CompressLMError(f"{method}: Hessian shape {tuple(hessian.shape)} does not match {in_f} input columns")
    if not torch.isfinite(hessian).all():
        raise CompressLMError(f"{method}: the Hessian contains NaN or infinite values")
    return hessian.detach().float()


def scores(method: str, weight: torch.Tensor, hessian: torch.Tensor | None = None, damp: float = 0.01) -> torch.Tensor:
    """Importance of every weight under `method` (higher = keep); used for masks chosen in one shot."""
    w = weight.detach().float()
    if method == "magnitude":
        return w.abs()
    h = _check_hessian(hessian, w.shape[1], method)
    if method == "wanda":
        return w.abs() * torch.diag(h).clamp_min(0).sqrt()[None, :]
    if method == "sparsegpt":  # OBS saliency with the full inverse Hessian (no sweep)
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(_damped(h, damp)))
        return w.pow(2) / torch.diag(hinv)[None, :].pow(2)
    raise CompressLMError(f"unknown pruning method '{method}'; choose one of {', '.join(METHODS)}")


def _damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    mean = torch.diag(h).mean()
    return h + damp * mean * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)


def _meta(method: str, pattern: SparsityPattern, mask: torch.Tensor, **extra) -> dict:
    return {
        "algorithm": method,
        "sparsity_pattern": pattern.describe(),
        "sparsity": 1.0 - float(mask.sum()) / mask.numel(),
        **extra,
    }


def magnitude(weight: torch.Tensor, pattern: SparsityPattern) -> CompressedWeight:
    """Keep the largest-magnitude weights; values stay float16."""
    check_weight(weight)
    mask = select_mask(scores("magnitude", weight), pattern)
    return CompressedWeight.unquantized(weight, mask, pattern.nm, _meta("magnitude", pattern, mask))


def wanda(weight: torch.Tensor, hessian: torch.Tensor, pattern: SparsityPattern) -> CompressedWeight:
    """Keep the weights with the largest |W|·‖x‖ (per row by default, as in the paper)."""
    check_weight(weight)
    mask = select_mask(scores("wanda", weight, hessian), pattern)
    return CompressedWeight.unquantized(weight, mask, pattern.nm, _meta("wanda", pattern, mask))


def saliency_mask(
    method: str, weight: torch.Tensor, hessian: torch.Tensor | None, pattern: SparsityPattern
) -> torch.Tensor:
    """The mask `method` would choose for a weight that is not updated afterwards."""
    return select_mask(scores(method, weight, hessian), pattern)


def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: SparsityPattern,
    grid: Grid | None = None,
    options: GPTQOptions | None = None,
    fit_on: str = "current",
) -> CompressedWeight:
    """Prune (and, with `grid`, quantize) `weight` minimising ‖(W − Ŵ)X‖² column by column.

    With a grid, each group's grid is fitted when the sweep reaches the group, on its kept weights
    as they stand then (`fit_on="current"`); the updates of the group's later columns can push
    weights past that range and clip them. `"final"` fits on where an unquantized SparseGPT pass
    leaves the weights instead, `"both"` on the union of the two ranges (one more pass each;
    `benchmarks/results/joint_grid_layer.md` measures them).
    """
    if fit_on not in ("current", "final", "both"):
        raise CompressLMError(f"sparsegpt: fit_on must be current, final or both, not {fit_on!r}")
    final = None
    if grid is not None and fit_on != "current":
        final = sparsegpt(weight, hessian, pattern, None, options).dequantize()
    options = options or GPTQOptions()
    check_weight(weight)
    pattern.check(tuple(weight.shape))
    _check_hessian(hessian, weight.shape[1], "sparsegpt")
    factor = factor_hessian(hessian, options.damp, options.max_damp_retries)
    hinv, lam, retries = factor.hinv, factor.damp_used, factor.retries
    w = weight.detach().float().clone()
    out_f, in_f = w.shape
    w[:, factor.dead] = 0.0

    grid = None if grid is None else grid.for_width(in_f)
    g = grid.group_size_for(in_f) if grid is not None else in_f
    quantize = grid is not None
    if quantize and grid.granularity == "tensor":
        raise CompressLMError("sparsegpt: joint quantization supports group-wise and per-channel grids")
    if quantize and grid.kquant:
        raise CompressLMError(
            f"sparsegpt: {grid.kquant} fits a super-block's scales together; "
            "prune first (grid_fit: after), then quantize"
        )
    step = g if quantize and grid.granularity == "group" else 1
    if pattern.is_nm:
        step = step * pattern.m // _gcd(step, pattern.m)
    block_size = step * max(1, options.block_size // step)  # groups and N:M groups never straddle a block
    n_groups = -(-in_f // g)
    scales = torch.zeros(out_f, n_groups, device=w.device)
    zeros = torch.zeros(out_f, n_groups, device=w.device)
    codes = torch.zeros_like(w)
    mask = torch.ones_like(w, dtype=torch.bool)

    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1)
        keep1 = torch.ones_like(w1, dtype=torch.bool)
        if not pattern.is_nm:
            keep1 = select_mask(w1.pow(2) / d[None, :].pow(2), pattern)
        for i in range(i2 - i1):
            col = i1 + i
            if pattern.is_nm and i % pattern.m == 0:
                part = w1[:, i : i + pattern.m].pow(2) / d[None, i : i + pattern.m].pow(2)
                keep1[:, i : i + pattern.m] = select_mask(part, SparsityPattern(n=pattern.n, m=pattern.m))
            if quantize and col % g == 0:
                chunk = w1[:, i : i + g] * keep1[:, i : i + g]
                if final is not None:
                    ahead = final[:, col : col + g]
                    chunk = ahead if fit_on == "final" else torch.cat([chunk, ahead], dim=1)
                scales[:, col // g], zeros[:, col // g] = fit_rows(chunk, grid)
            column = w1[:, i]
            q = column * keep1[:, i]
            if quantize:
                s, z = scales[:, col // g], zeros[:, col // g]
                code = torch.where(keep1[:, i], quantize_codes(column, s, z, grid.maxq), z)
                codes[:, col] = code
                q = (code - z) * s
            err = (column - q) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = w1
        mask[:, i1:i2] = keep1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    meta = _meta("sparsegpt", pattern, mask, damp=options.damp, damp_used=lam, damp_retries=retries)
    if not quantize:
        return CompressedWeight.unquantized(w, mask, pattern.nm, meta)
    meta["grid"] = grid.describe()
    return to_compressed(codes, scales, zeros, grid, meta, mask=mask, nm=pattern.nm)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def apply_mask(record: CompressedWeight, mask: torch.Tensor, nm: tuple[int, int] | None) -> CompressedWeight:
    """`record` with `mask` added: pruned codes become the zero point, pruned values exact zeros."""
    if record.mask is not None:
        mask = mask & record.mask
    if not record.quantized:
        return CompressedWeight.unquantized(record.values, mask, nm, record.meta)
    zeros = record.zeros if record.per_tensor else expand_groups(record.zeros, record.in_features, record.group_size)
    codes = torch.where(mask, record.codes, zeros.expand_as(record.codes))
    return dataclasses.replace(record, codes=codes, mask=mask, nm=nm, meta=dict(record.meta))
