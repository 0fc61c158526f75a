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
  so a group's scale always sees its updated columns. A K-quant grid's sub-block scales share their
  super-block's float16 step, so they are fitted together when the sweep reaches the super-block.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from compresslm.compressed import CompressedWeight
from compresslm.errors import CompressLMError
from compresslm.quant.grid import (
    SUPER_BLOCK,
    Grid,
    check_weight,
    fit_rows,
    fit_weight,
    quantize_codes,
    to_compressed,
)

# Columns whose updates are applied one by one before the rest of their block gets them in one product.
_RUN = 32


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
    """Upper Cholesky factor of (H + λI)⁻¹, raising λ tenfold on failure. Returns (factor, λ, retries).

    With P the order reversal, P(H + λI)P = L Lᵀ gives (H + λI)⁻¹ = (P L⁻¹ P)ᵀ (P L⁻¹ P), and P L⁻¹ P is
    upper triangular: one Cholesky and one triangular inverse, where inverting H and factoring the
    inverse take two Cholesky factorizations and an inverse. `h` is in sweep order (`factor_hessian`
    builds the reversed matrix directly, one copy fewer).
    """
    lower, lam, attempt = _damped_cholesky(h.flip(0, 1), torch.mean(torch.diag(h)).item(), damp, retries)
    return _lower_inverse(lower).flip(0, 1), lam, attempt


def _damped_cholesky(reversed_h: torch.Tensor, mean_diag: float, damp: float, retries: int):
    """Lower Cholesky factor of `reversed_h` + λI, λ = damp x the mean diagonal, raised tenfold on failure;
    `reversed_h` is damped in place (a scratch copy: a layer's Hessian can be a large share of memory)."""
    lam = damp * mean_diag if mean_diag > 0 else damp
    added = 0.0
    for attempt in range(retries + 1):
        reversed_h.diagonal().add_(lam - added)
        added = lam
        lower, info = torch.linalg.cholesky_ex(reversed_h)
        if int(info) == 0:
            return lower, lam, attempt
        lam *= 10.0
    raise CompressLMError(
        f"GPTQ: the Hessian is not positive definite even with damping {lam / 10:.3g} "
        f"after {retries} retries; check the calibration inputs for NaN or constant features"
    )


def _lower_inverse(lower: torch.Tensor) -> torch.Tensor:
    """The inverse of a lower triangular matrix, by halves: [[A, 0], [C, D]]⁻¹ = [[A⁻¹, 0], [-D⁻¹CA⁻¹, D⁻¹]],
    so most of the work is matrix products."""
    n = lower.shape[0]
    if n <= 1024:
        return torch.linalg.solve_triangular(lower, torch.eye(n, dtype=lower.dtype, device=lower.device), upper=False)
    k = n // 2
    out = torch.zeros_like(lower)
    out[:k, :k] = _lower_inverse(lower[:k, :k])
    out[k:, k:] = _lower_inverse(lower[k:, k:])
    out[k:, :k] = -(out[k:, k:] @ (lower[k:, :k] @ out[:k, :k]))
    return out


@dataclass(frozen=True)
class HessianFactor:
    """What a GPTQ-style sweep needs from a layer's input Hessian: computed once per Hessian.

    Layers that read the same input (q, k and v; gate and up) share one Hessian, so the most
    recent factor is kept and handed to the next layer that asks for it with the same Hessian
    object, unchanged since, and the same options: the result is what a fresh factorization gives.
    """

    hinv: torch.Tensor  # upper Cholesky factor of (H + λI)⁻¹, rows and columns in sweep order
    perm: torch.Tensor | None  # the sweep order (act-order: decreasing Hessian diagonal); None: as stored
    dead: torch.Tensor  # input columns whose inputs were always zero (their weights are zeroed)
    damp_used: float
    retries: int


_last_factor: tuple[weakref.ref, int, tuple, HessianFactor] | None = None


def factor_hessian(hessian: torch.Tensor, damp: float, retries: int, act_order: bool = False) -> HessianFactor:
    """The `HessianFactor` of `hessian` (checked finite), reusing the last one when it is for the same Hessian."""
    global _last_factor
    key = (damp, retries, act_order)
    if _last_factor is not None:
        ref, version, last_key, factor = _last_factor
        if ref() is hessian and version == hessian._version and last_key == key:
            return factor
    _last_factor = None  # its memory is free before the next factorization takes more
    if not torch.isfinite(hessian).all():
        raise CompressLMError("GPTQ: the Hessian contains NaN or infinite values")
    diag = torch.diag(hessian).float()
    dead = diag == 0
    diag[dead] = 1.0  # a dead input's Hessian row is zero: its diagonal is set to 1 (its weights are zeroed)
    perm = torch.argsort(diag, descending=True) if act_order else None
    # `inverse_cholesky`'s steps, holding at most about two in² copies at a time: the scratch matrix is
    # gathered straight into reversed sweep order, and each copy is dropped once the next one exists
    order = (perm if perm is not None else torch.arange(len(diag), device=diag.device)).flip(0)
    reversed_h = hessian.detach().float().index_select(0, order).index_select(1, order)
    reversed_h.diagonal()[dead[order]] = 1.0
    mean_diag = torch.mean(torch.diag(reversed_h).flip(0)).item()
    lower, lam, used = _damped_cholesky(reversed_h, mean_diag, damp, retries)
    del reversed_h
    hinv = _lower_inverse(lower)
    del lower
    factor = HessianFactor(hinv.flip(0, 1), perm, dead, lam, used)
    del hinv
    _last_factor = (weakref.ref(hessian), hessian._version, key, factor)
    return factor


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

    Within each block of columns the error of a column is first spread over a short run of the
    columns after it (`_RUN`), and each finished run over the rest of the block by one matrix
    product, so the per-column updates touch a few columns instead of the whole block.
    """
    options = options or GPTQOptions()
    check_weight(weight)
    out_f, in_f = weight.shape
    if hessian.shape != (in_f, in_f):
        raise CompressLMError(f"GPTQ: Hessian shape {tuple(hessian.shape)} does not match {in_f} input columns")
    factor = factor_hessian(hessian, options.damp, options.max_damp_retries, options.act_order)

    w = weight.detach().float().clone()
    if mask is not None:
        if mask.shape != w.shape or mask.dtype != torch.bool:
            raise CompressLMError(f"GPTQ: mask must be bool of shape {tuple(w.shape)}")
        w = w.masked_fill(~mask, 0.0)
    w[:, factor.dead] = 0.0
    importance = hessian.diagonal().float().clamp_min(0)  # the clip search's column weights (grid.fit_rows)

    grid = grid.for_width(in_f)
    g = grid.group_size_for(in_f)
    unit = SUPER_BLOCK if grid.kquant else g  # the columns whose scales are fitted together
    dynamic = grid.granularity == "group" and not (options.act_order or options.static_groups)
    group_of_column = torch.arange(in_f, device=w.device) // g if grid.granularity != "tensor" else None
    if dynamic:
        n_groups = -(-in_f // g)
        scales = torch.zeros(out_f, n_groups, device=w.device)
        zeros = torch.zeros(out_f, n_groups, device=w.device)
        block_size = unit * max(1, options.block_size // unit)  # groups never straddle a block
        run = math.gcd(g, _RUN)  # nor a run, so that a group's scale sees every update before it
    else:
        scales, zeros = fit_weight(w, grid, importance=importance)
        block_size, run = options.block_size, _RUN

    keep = mask
    perm = factor.perm
    if perm is not None:
        w = w[:, perm]
        keep = None if mask is None else mask[:, perm]
        if group_of_column is not None:
            group_of_column = group_of_column[perm]
    # the sweep works on the transpose: a column is then a contiguous row, and so is every update of it
    wt, keep_t = w.T.contiguous(), None if keep is None else keep.T.contiguous()
    del w
    per_tensor = grid.granularity == "tensor"
    scales_t, zeros_t = (None, None) if per_tensor else (scales.T.contiguous(), zeros.T.contiguous())  # [groups, out]
    group_list = None if per_tensor else group_of_column.tolist()
    hinv = factor.hinv
    codes_t = torch.zeros_like(wt)
    proxy_loss = 0.0
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w1 = wt[i1:i2]  # a view: these rows are not read again once quantized
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for j1 in range(0, i2 - i1, run):
            j2 = min(j1 + run, i2 - i1)
            for i in range(j1, j2):
                col = i1 + i
                if dynamic and col % unit == 0:
                    chunk = w1[i : i + unit].T if keep_t is None else (w1[i : i + unit] * keep_t[col : col + unit]).T
                    if grid.kquant:  # a super-block's sub-block scales share one float16 d
                        s, z = fit_weight(chunk, grid, importance=importance[col : col + unit])
                        scales_t[col // g : (col + unit) // g], zeros_t[col // g : (col + unit) // g] = s.T, z.T
                    else:
                        part = importance[col : col + unit]
                        scales_t[col // g], zeros_t[col // g] = fit_rows(chunk, grid, importance=part)
                if per_tensor:
                    s, z = scales.view(1).expand(out_f), zeros.view(1).expand(out_f)
                else:
                    s, z = scales_t[group_list[col]], zeros_t[group_list[col]]
                column = w1[i]
                code = quantize_codes(column, s, z, grid.maxq, grid.fractional_zero)
                if keep_t is not None:
                    code = torch.where(keep_t[col], code, z)
                codes_t[col] = code
                err = (column - (code - z) * s) / hinv1[i, i]
                if i + 1 < j2:
                    w1[i + 1 : j2] -= hinv1[i, i + 1 : j2, None] * err
                err1[i] = err
            if j2 < i2 - i1:
                w1[j2:].addmm_(hinv1[j1:j2, j2:].T, err1[j1:j2], alpha=-1)
        for column_loss in err1.square().sum(dim=1).tolist():  # column by column, in sweep order
            proxy_loss += column_loss / 2
        if i2 < in_f:
            wt[i2:].addmm_(hinv[i1:i2, i2:].T, err1, alpha=-1)

    codes = codes_t.T
    if not per_tensor:
        scales, zeros = scales_t.T.contiguous(), zeros_t.T.contiguous()
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    codes = codes.contiguous()
    meta = {
        "algorithm": "gptq",
        "grid": grid.describe(),
        "damp": options.damp,
        "damp_used": factor.damp_used,
        "damp_retries": factor.retries,
        "act_order": options.act_order,
        "static_groups": not dynamic and grid.granularity == "group",
        "proxy_loss": proxy_loss,
    }
    return to_compressed(codes, scales, zeros, grid, meta, mask=mask, nm=nm)
