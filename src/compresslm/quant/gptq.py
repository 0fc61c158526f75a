"""GPTQ (Frantar et al., 2022) as a pure function of a weight, its input Hessian and a grid.

Columns are quantized one at a time; the error of each is spread over the columns not yet
quantized through the inverse Hessian's Cholesky factor (optimal brain surgeon updates), applied
lazily in blocks. Options:

* `damp`: fraction of the mean Hessian diagonal added to the diagonal. If the Cholesky fails the
  damping is multiplied by 10 and retried; the damping used and the retries are reported in
  `CompressedWeight.meta`, never hidden.
* `act_order`: quantize columns in order of decreasing Hessian diagonal. With group-wise grids
  this uses *static* groups (each group's scale fitted on the original weight before any update),
  so codes stay in the original column order and need no permutation index at load time.
* Dynamic groups (the default without act-order): each group's scale is fitted on the updated
  weight when the sweep reaches the group, as in the reference code. Blocks are aligned to groups
  so a group's scale always sees its updated columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compresslm.compressed import CompressedWeight
from compresslm.errors import CompressLMError
from compresslm.quant.grid import Grid, check_weight, fit_rows, fit_weight, quantize_codes, to_compressed


@dataclass(frozen=True)
class GPTQOptions:
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    static_groups: bool = False
    max_damp_retries: int = 6


def hessian_from_inputs(inputs: torch.Tensor) -> torch.Tensor:
    """2/n · XᵀX for inputs X [n, in] (the GPTQ Hessian of the layer-wise squared error)."""
    x = inputs.reshape(-1, inputs.shape[-1]).float()
    return (2.0 / x.shape[0]) * (x.T @ x)


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ): the summed squared output error over the calibration inputs (up to 2/n)."""
    delta = weight - approx
    return float(((delta @ hessian) * delta).sum())


def inverse_cholesky(h: torch.Tensor, damp: float, retries: int) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of (H + λI)⁻¹, raising λ tenfold on failure. Returns (factor, λ, retries)."""
    mean_diag = torch.mean(torch.diag(h)).item()
    lam = damp * mean_diag if mean_diag > 0 else damp
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(retries + 1):
        chol, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper, lam, attempt
        lam *= 10.0
    raise CompressLMError(
        f"GPTQ: the Hessian is not positive definite even with damping {lam / 10:.3g} "
        f"after {retries} retries; check the calibration inputs for NaN or constant features"
    )


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: Grid,
    options: GPTQOptions | None = None,
    mask: torch.Tensor | None = None,
    nm: tuple[int, int] | None = None,
) -> CompressedWeight:
    """Quantize `weight` [out, in] to `grid`, minimising ‖(W - Q) X‖² for inputs with Hessian `hessian`.

    With a sparsity `mask` (True = kept, e.g. from an earlier pruning stage) pruned weights are
    held at exactly zero and their error is compensated like any rounding error.
    """
    options = options or GPTQOptions()
    check_weight(weight)
    out_f, in_f = weight.shape
    if hessian.shape != (in_f, in_f):
        raise CompressLMError(f"GPTQ: Hessian shape {tuple(hessian.shape)} does not match {in_f} input columns")
    if not torch.isfinite(hessian).all():
        raise CompressLMError("GPTQ: the Hessian contains NaN or infinite values")

    w = weight.detach().float().clone()
    if mask is not None:
        if mask.shape != w.shape or mask.dtype != torch.bool:
            raise CompressLMError(f"GPTQ: mask must be bool of shape {tuple(w.shape)}")
        w = w.masked_fill(~mask, 0.0)
    h = hessian.detach().float().clone().to(w.device)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    g = grid.group_size_for(in_f)
    dynamic = grid.granularity == "group" and not (options.act_order or options.static_groups)
    group_of_column = torch.arange(in_f, device=w.device) // g if grid.granularity != "tensor" else None
    if dynamic:
        n_groups = -(-in_f // g)
        scales = torch.zeros(out_f, n_groups, device=w.device)
        zeros = torch.zeros(out_f, n_groups, device=w.device)
        block_size = g * max(1, options.block_size // g)  # groups never straddle a block
    else:
        scales, zeros = fit_weight(w, grid)
        block_size = options.block_size

    keep = mask
    perm = None
    if options.act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
        keep = None if mask is None else mask[:, perm]
        if group_of_column is not None:
            group_of_column = group_of_column[perm]

    hinv, lam, retries = inverse_cholesky(h, options.damp, options.max_damp_retries)
    codes = torch.zeros_like(w)
    proxy_loss = 0.0
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if dynamic and col % g == 0:
                chunk = w1[:, i : i + g] if keep is None else w1[:, i : i + g] * keep[:, col : col + g]
                s, z = fit_rows(chunk, grid)
                scales[:, col // g], zeros[:, col // g] = s, z
            if grid.granularity == "tensor":
                s, z = scales.view(1).expand(out_f), zeros.view(1).expand(out_f)
            else:
                s, z = scales[:, group_of_column[col]], zeros[:, group_of_column[col]]
            column = w1[:, i]
            code = quantize_codes(column, s, z, grid.maxq)
            if keep is not None:
                code = torch.where(keep[:, col], code, z)
            q = (code - z) * s
            codes[:, col] = code
            d = hinv1[i, i]
            err = (column - q) / d
            proxy_loss += float(((column - q) ** 2).sum() / d**2) / 2
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    meta = {
        "algorithm": "gptq",
        "grid": grid.describe(),
        "damp": options.damp,
        "damp_used": lam,
        "damp_retries": retries,
        "act_order": options.act_order,
        "static_groups": not dynamic and grid.granularity == "group",
        "proxy_loss": proxy_loss,
    }
    return to_compressed(codes, scales, zeros, grid, meta, mask=mask, nm=nm)
