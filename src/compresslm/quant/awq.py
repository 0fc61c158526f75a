"""AWQ (Lin et al., 2023): activation-aware per-channel scaling and clipping, as pure functions.

Salient input channels (large mean |x|) are scaled up before quantization, W' = W·diag(s), and
the inverse scale is folded into the operation that produces the input (a norm, or the previous
linear's rows), so the float model is unchanged while the quantization error moves away from the
channels that matter. s = mean|x|^α, normalised; α is searched on a grid.

Where the reference implementation scores each α by running the parent module on calibration
tokens, we score it by the layer-wise output error, which the input Hessian H = 2/n·XᵀX gives
exactly for every calibration token at once: ‖X(W − Ŵ)ᵀ‖² ∝ tr((W − Ŵ) H (W − Ŵ)ᵀ). The clip
search uses the same error restricted to each group's columns. α = 0 (no scaling) and shrink 1
(no clipping) are candidates, so neither search can be worse than plain RTN by this measure.
"""

from __future__ import annotations

import torch

from compresslm.compressed import CompressedWeight
from compresslm.quant.gptq import output_error
from compresslm.quant.grid import Grid, check_weight, fake_quantize, fit_weight, quantize_weight, to_compressed


def awq_scales(
    weights: list[torch.Tensor], hessian: torch.Tensor, act_mean: torch.Tensor, grid: Grid, n_grid: int = 20
) -> tuple[torch.Tensor, float, float, float]:
    """Search per-input-channel scales for linears that share one input.

    Returns (scales [in], best α, error at α = 0, best error); multiply the weights' columns by
    the scales and divide the input by them.
    """
    for w in weights:
        check_weight(w)
    mean = act_mean.float().clamp(min=1e-5)
    best = (torch.ones_like(mean), 0.0, float("inf"))
    plain = None
    for step in range(n_grid):
        alpha = step / n_grid
        s = mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w in weights:
            w = w.float()
            approx = fake_quantize(w * s, grid) / s
            err += output_error(w, approx, hessian)
        if step == 0:
            plain = err
        if err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1], plain, best[2]


def awq_clip(
    weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, n_grid: int = 20, max_shrink: float = 0.5
) -> CompressedWeight:
    """RTN with each group's range shrunk to minimise that group's output error (AWQ's clip search)."""
    check_weight(weight)
    w = weight.float()
    out_f, in_f = w.shape
    grid = grid.for_width(in_f)
    scales, _ = fit_weight(w, grid)
    n_groups = scales.shape[1]
    g = in_f if grid.granularity == "tensor" else grid.group_size_for(in_f)
    best_err = torch.full((out_f, n_groups), float("inf"), device=w.device)
    best_shrink = torch.ones(out_f, n_groups, device=w.device)
    for step in range(int(max_shrink * n_grid) + 1):
        shrink_value = 1.0 - step / n_grid
        shrink = torch.full((out_f, n_groups), shrink_value, device=w.device)
        delta = w - fake_quantize(w, grid, shrink if grid.granularity != "tensor" else shrink[:1, :1])
        errs = []
        for group in range(n_groups):
            cols = slice(group * g, min((group + 1) * g, in_f))
            d = delta[:, cols]
            errs.append(((d @ hessian[cols, cols]) * d).sum(dim=1))
        err = torch.stack(errs, dim=1)
        if grid.granularity == "tensor":
            err = err.sum().expand(out_f, n_groups)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_shrink = torch.where(better, shrink, best_shrink)
    if grid.granularity == "tensor":
        best_shrink = best_shrink[:1, :1]
    scales, zeros = fit_weight(w, grid, best_shrink)
    codes = quantize_weight(w, grid, scales, zeros)
    meta = {"algorithm": "awq-clip", "grid": grid.describe(), "mean_shrink": float(best_shrink.mean())}
    return to_compressed(codes, scales, zeros, grid, meta)
